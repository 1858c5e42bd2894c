// The node's event hub, behind `GET /api/events` and the console: it reads the mesh as this node sees it
// (`readMeshState`: the node actor's snapshot, its peer machines, the endpoint's paths and RTTs, the tunnels,
// llama-server's load progress), diffs it against the last reading (src/machines/mesh-events.ts) on every
// snapshot of the node actor and on a short tick (the tunnels, RTTs and progress live outside the actor), and
// tells every subscriber each event, numbered. Requests come from the API as they start and end.
import type { Actor } from 'xstate';
import type { TunnelsStatus } from '../actors/tunnels.actor.ts';
import type { RequestReport } from '../io/http/survival.ts';
import type { MeshConnection } from '../io/transport/transport.ts';
import type { LlamaLoadProgress } from '../io/llama/llama-server-output.ts';
import type { EndpointId, Plan } from '../machines/mesh-types.ts';
import { runningRole, type nodeMachine } from '../machines/node.machine.ts';
import {
  meshNodeView,
  diffMeshState,
  dottedState,
  type LoadView,
  type MeshEvent,
  type MeshEventBody,
  type MeshState,
  type PeerView,
  type PlanView,
  type RequestFinished,
  type RequestStarted,
  type TunnelView,
} from '../machines/mesh-events.ts';

/** Load progress as the llama-server slot reports it (src/actors/llama-server.actor.ts's onProgress). */
export type LoadProgress = LlamaLoadProgress & { readonly planId: string; readonly generation: number };

export interface MeshStateSources {
  readonly actor: Actor<typeof nodeMachine>;
  readonly meshId: string;
  readonly connection: (id: EndpointId) => Pick<MeshConnection, 'isDirect' | 'paths'> | undefined;
  readonly tunnels: () => Pick<TunnelsStatus, 'connections'> & Partial<Pick<TunnelsStatus, 'llamaDialsDirect'>>;
  readonly load: () => LoadProgress | null;
}

type Snapshotted = { getSnapshot(): { value?: unknown; context?: unknown } } | undefined;

const RECENT_REQUESTS = 20;

/** The mesh as this node sees it now, without the requests (the hub keeps those). */
export function readMeshState(src: MeshStateSources): Omit<MeshState, 'requests'> {
  const snap = src.actor.getSnapshot();
  const c = snap.context;
  const children = snap.children as Record<string, Snapshotted>;
  const stats = src.tunnels();
  // The host's llama-server dialing a worker's data port itself (TLS, patch 0003): a tunnel of its own kind.
  const tunnels = [...stats.connections, ...(stats.llamaDialsDirect ?? []).map((d) => ({ peer: d.peer, kind: 'rpc', side: 'llama-server', path: 'direct' }))];
  const name = (id: EndpointId) => c.view.announcements[id]?.name ?? id.slice(0, 10);
  const peers: Record<string, PeerView> = {};
  for (const [key, ref] of Object.entries(c.peers)) {
    const id = key as EndpointId;
    const ps = (ref as Snapshotted)?.getSnapshot();
    const state = dottedState(ps?.value);
    const lastDown = (ps?.context as { lastDownReason?: string | null } | undefined)?.lastDownReason ?? null;
    peers[id] = { id, name: name(id), state, lastDown, link: linkOf(src.connection(id), tunnels.some((t) => t.peer === id && t.path === 'direct')) };
  }
  const llama = children['llamaServer']?.getSnapshot();
  const progress = src.load();
  return {
    self: { id: c.self.id, name: c.self.name, meshId: src.meshId, role: runningRole(c) },
    nodes: Object.values(c.view.announcements).map(meshNodeView),
    peers,
    plan: planView(c.plan, name),
    runningPlanId: c.running?.id ?? null,
    machines: {
      node: dottedState(snap.value),
      election: dottedState(children['election']?.getSnapshot().value),
      rpcServer: dottedState(children['rpcServer']?.getSnapshot().value),
      llamaServer: dottedState(llama?.value),
    },
    processes: {
      rpcServer: { state: c.rpc, port: c.rpcPort },
      llamaServer: { state: c.llama, port: c.llamaPort, generation: c.generation },
    },
    load: progress === null ? null : loadView(progress),
    lastCrash: (llama?.context as { lastCrash?: string | null } | undefined)?.lastCrash ?? null,
    tunnels: tunnelViews(tunnels),
  };
}

function linkOf(conn: Pick<MeshConnection, 'isDirect' | 'paths'> | undefined, directTls: boolean): PeerView['link'] {
  if (conn === undefined) return null;
  let rttMs: number | null = null;
  try {
    const selected = conn.paths().find((p) => p.selected);
    rttMs = selected === undefined ? null : Math.round(selected.rttMs * 10) / 10;
  } catch {
    // a connection closing under us: no figure
  }
  return { kind: directTls ? 'direct-tls' : conn.isDirect() ? 'quic-direct' : 'relay', rttMs };
}

function planView(plan: Plan | null, name: (id: EndpointId) => string): PlanView | null {
  if (plan === null) return null;
  if (plan.kind === 'waiting') return { id: plan.id, kind: 'waiting', host: null, stages: [], model: null, reason: plan.reason };
  return {
    id: plan.id,
    kind: 'ready',
    host: plan.host,
    stages: plan.stages.map((s) => ({ id: s.id, name: name(s.id), share: s.share })),
    model: plan.model.name,
    reason: null,
  };
}

function loadView(p: LoadProgress): LoadView {
  return { planId: p.planId, generation: p.generation, phase: p.phase, percent: p.fraction === null ? null : Math.round(p.fraction * 1000) / 10 };
}

function tunnelViews(connections: readonly { readonly peer: EndpointId; readonly kind: string; readonly side: string; readonly path: string }[]): TunnelView[] {
  const counts = new Map<string, TunnelView>();
  for (const t of connections) {
    const k = `${t.peer} ${t.kind} ${t.side} ${t.path}`;
    const had = counts.get(k);
    counts.set(k, { peer: t.peer, kind: t.kind, side: t.side, path: t.path, count: (had?.count ?? 0) + 1 });
  }
  return [...counts.values()].sort((a, b) => (a.peer + a.kind + a.side + a.path).localeCompare(b.peer + b.kind + b.side + b.path));
}

export interface EventHubInit {
  readonly read: () => Omit<MeshState, 'requests'>;
  /** How often the state outside the node actor is read (default 500 ms). */
  readonly tickMs?: number;
  /** Subscribe to the node actor's snapshots: each one reads the state at once. */
  readonly follow?: (onChange: () => void) => () => void;
}

/** Events to subscribers, in order, each numbered; a snapshot for whoever connects. */
export class MeshEventHub {
  private state: MeshState | null = null;
  private seq = 0;
  private readonly listeners = new Set<(e: MeshEvent) => void>();
  private readonly inFlight = new Map<string, RequestStarted>();
  private recent: RequestFinished[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  private unfollow: (() => void) | null = null;

  constructor(private readonly init: EventHubInit) {}

  start(): void {
    this.refresh();
    this.timer = setInterval(() => this.refresh(), this.init.tickMs ?? 500);
    this.timer.unref();
    this.unfollow = this.init.follow?.(() => this.refresh()) ?? null;
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.unfollow?.();
    this.unfollow = null;
    this.listeners.clear();
  }

  /** Reads the state and tells what changed. */
  refresh(): void {
    let read: Omit<MeshState, 'requests'>;
    try {
      read = this.init.read();
    } catch {
      return; // the node is stopping: its actor's children are gone
    }
    const next: MeshState = { ...read, requests: this.requests() };
    if (this.state !== null) for (const body of diffMeshState(this.state, next)) this.emit(body);
    this.state = next;
  }

  /** What a client gets first. */
  snapshot(): MeshEvent {
    this.refresh();
    return { type: 'snapshot', state: this.state!, seq: this.seq, at: Date.now() };
  }

  subscribe(listener: (e: MeshEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** The API's report of a request (src/io/http/survival.ts). */
  readonly request = (r: RequestReport): void => {
    if (r.phase === 'started') {
      const started: RequestStarted = { id: r.id, route: r.route, stream: r.stream, maxTokens: r.maxTokens, startedAt: r.startedAt };
      this.inFlight.set(r.id, started);
      this.setRequests();
      this.emit({ type: 'request.started', request: started });
      return;
    }
    if (r.phase === 'continued') {
      this.emit({ type: 'request.continued', id: r.id, attempt: r.attempt, confirmedTokens: r.confirmedTokens, reason: r.reason });
      return;
    }
    const started = this.inFlight.get(r.id);
    this.inFlight.delete(r.id);
    const { phase: _, ...done } = r;
    const finished: RequestFinished = { ...done, startedAt: started?.startedAt ?? r.startedAt };
    this.recent = [...this.recent, finished].slice(-RECENT_REQUESTS);
    this.setRequests();
    this.emit({ type: 'request.finished', request: finished });
  };

  private requests(): MeshState['requests'] {
    return { inFlight: [...this.inFlight.values()], recent: this.recent };
  }

  private setRequests(): void {
    if (this.state !== null) this.state = { ...this.state, requests: this.requests() };
  }

  private emit(body: MeshEventBody): void {
    const event = { ...body, seq: ++this.seq, at: Date.now() } as MeshEvent;
    for (const l of this.listeners) {
      try {
        l(event);
      } catch {
        // one subscriber's failure is its own
      }
    }
  }
}

