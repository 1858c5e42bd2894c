// What `GET /api/events` tells (the console at `/` lives on it): the state of the mesh as one node sees it
// (`MeshState`, the first event a client gets), and the typed events that each change of that state makes
// (`diffMeshState`, pure: the node's event hub, src/node/event-hub.ts, reads the state, diffs it against the
// last one and stamps each event with `seq` and `at`). Requests are not read: the API reports them as they
// start and end (src/io/http/survival.ts) and the hub passes those on as they come. The catalogue is in
// docs/console.md.
import type { Announcement, EndpointId } from './mesh-types.ts';

/** One node of the mesh as the view holds it (its signed announcement). */
export interface MeshNodeView {
  readonly id: EndpointId;
  readonly name: string;
  /** The role it prefers: auto | host | worker | client. */
  readonly role: string;
  readonly vramBytes: number;
  readonly model: string | null;
  readonly serving: boolean;
  /** Peers it has a direct connection to (relayed ones never count). */
  readonly connectedTo: readonly EndpointId[];
}

/** A node's announcement as the console and /api/status show it. */
export function meshNodeView(a: Announcement): MeshNodeView {
  return { id: a.id, name: a.name, role: a.role, vramBytes: a.vramBytes, model: a.model?.name ?? null, serving: a.serving, connectedTo: a.connectedTo };
}

/** How this node reaches a peer: direct TLS (the data port), QUIC on a direct UDP path, or a relay. */
export type LinkKind = 'direct-tls' | 'quic-direct' | 'relay';

export interface PeerView {
  readonly id: EndpointId;
  readonly name: string;
  /** The peer machine's state, dotted: dialing, handshaking, up.connected, up.suspect, gone... */
  readonly state: string;
  /** Why it last went down (null while it never did). */
  readonly lastDown: string | null;
  /** Null while there is no connection. */
  readonly link: { readonly kind: LinkKind; readonly rttMs: number | null } | null;
}

export interface PlanView {
  readonly id: string;
  readonly kind: 'ready' | 'waiting';
  readonly host: EndpointId | null;
  /** In `--rpc` order, the host's own stage last; each with its name and share (0..1) of the layers. */
  readonly stages: readonly { readonly id: EndpointId; readonly name: string; readonly share: number }[];
  readonly model: string | null;
  /** Why nothing can start (waiting plans). */
  readonly reason: string | null;
}

export interface LoadView {
  readonly planId: string;
  readonly generation: number;
  readonly phase: 'starting' | 'loading' | 'ready';
  /** 0..100 while loading, when llama-server says; null otherwise. */
  readonly percent: number | null;
}

export interface TunnelView {
  readonly peer: EndpointId;
  /** Stream kind: rpc | http. */
  readonly kind: string;
  /** Whether this node opened it (`opened`), the peer did (`accepted`), or the host's llama-server dials the worker's data port itself (`llama-server`). */
  readonly side: string;
  /** The data path chosen: direct (TCP + TLS to the peer's data port) or quic (a stream of the mesh connection). */
  readonly path: string;
  /** How many such connections are open now. */
  readonly count: number;
}

export interface RequestStarted {
  readonly id: string;
  readonly route: 'chat' | 'completion';
  readonly stream: boolean;
  readonly maxTokens: number | null;
  readonly startedAt: number;
}

export interface RequestFinished extends RequestStarted {
  /** stop | length (the model's finish_reason), or failed / abandoned (the client left). */
  readonly outcome: string;
  readonly promptTokens: number | null;
  readonly completionTokens: number;
  readonly durationMs: number;
  /** Time to the first generated token (null: none came). */
  readonly firstTokenMs: number | null;
  /** Generation speed after the first token (null with fewer than 2 tokens). */
  readonly tokensPerSecond: number | null;
  /** How many times the request was continued after a cut. */
  readonly continuations: number;
  readonly error: string | null;
}

export interface MeshState {
  readonly self: { readonly id: EndpointId; readonly name: string; readonly meshId: string; readonly role: string };
  /** The view: every announced node, this one included. */
  readonly nodes: readonly MeshNodeView[];
  /** This node's peer machines, by id. */
  readonly peers: Readonly<Record<string, PeerView>>;
  /** The plan the election chose last, and the id of the one whose processes run. */
  readonly plan: PlanView | null;
  readonly runningPlanId: string | null;
  /** Every machine's state, dotted: node, election, rpcServer, llamaServer. */
  readonly machines: Readonly<Record<string, string>>;
  readonly processes: {
    readonly rpcServer: { readonly state: string; readonly port: number | null };
    readonly llamaServer: { readonly state: string; readonly port: number | null; readonly generation: number };
  };
  /** llama-server's load of the current generation (host only); null before the first. */
  readonly load: LoadView | null;
  readonly lastCrash: string | null;
  readonly tunnels: readonly TunnelView[];
  readonly requests: { readonly inFlight: readonly RequestStarted[]; readonly recent: readonly RequestFinished[] };
}

/** An event's payload; the hub adds `seq` (1, 2, ... per node run) and `at` (ms since the epoch). */
export type MeshEventBody =
  | { readonly type: 'snapshot'; readonly state: MeshState }
  | { readonly type: 'node.seen'; readonly node: MeshNodeView }
  | { readonly type: 'node.forgotten'; readonly id: EndpointId }
  | { readonly type: 'self.role'; readonly role: string }
  | { readonly type: 'peer.admitted' | 'peer.suspect' | 'peer.recovered' | 'peer.gone' | 'peer.state'; readonly peer: PeerView }
  | { readonly type: 'peer.removed'; readonly id: EndpointId }
  | { readonly type: 'link.changed'; readonly peer: EndpointId; readonly link: PeerView['link'] }
  | { readonly type: 'plan.elected'; readonly plan: PlanView | null }
  | { readonly type: 'plan.running'; readonly planId: string | null }
  | { readonly type: 'machine.state'; readonly machine: string; readonly state: string }
  | { readonly type: 'process.state'; readonly process: 'rpcServer' | 'llamaServer'; readonly state: string; readonly port: number | null; readonly generation?: number }
  | { readonly type: 'llama.spawning'; readonly planId: string | null; readonly generation: number }
  | { readonly type: 'llama.loading'; readonly planId: string | null; readonly generation: number; readonly percent: number | null }
  | { readonly type: 'llama.ready'; readonly planId: string | null; readonly generation: number; readonly port: number | null }
  | { readonly type: 'llama.crashed'; readonly planId: string | null; readonly generation: number; readonly reason: string | null }
  | { readonly type: 'llama.stopped'; readonly generation: number }
  | { readonly type: 'tunnel.path'; readonly tunnel: TunnelView }
  | { readonly type: 'tunnel.closed'; readonly tunnel: TunnelView }
  | { readonly type: 'request.started'; readonly request: RequestStarted }
  | { readonly type: 'request.continued'; readonly id: string; readonly attempt: number; readonly confirmedTokens: number; readonly reason: string }
  | { readonly type: 'request.finished'; readonly request: RequestFinished };

export type MeshEvent = MeshEventBody & { readonly seq: number; readonly at: number };

export type MeshEventType = MeshEventBody['type'];

/** Every event type, in the catalogue's order (docs/console.md; the tests check both agree). */
export const MESH_EVENT_TYPES: readonly MeshEventType[] = [
  'snapshot',
  'node.seen',
  'node.forgotten',
  'self.role',
  'peer.admitted',
  'peer.suspect',
  'peer.recovered',
  'peer.gone',
  'peer.state',
  'peer.removed',
  'link.changed',
  'plan.elected',
  'plan.running',
  'machine.state',
  'process.state',
  'llama.spawning',
  'llama.loading',
  'llama.ready',
  'llama.crashed',
  'llama.stopped',
  'tunnel.path',
  'tunnel.closed',
  'request.started',
  'request.continued',
  'request.finished',
];

const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

/** An RTT change worth telling: 2 ms and a quarter of the old value at least. */
function rttMoved(a: number | null, b: number | null): boolean {
  if (a === null || b === null) return a !== b;
  return Math.abs(a - b) >= Math.max(2, a * 0.25);
}

function peerEvent(prev: PeerView | undefined, next: PeerView): 'peer.admitted' | 'peer.suspect' | 'peer.recovered' | 'peer.gone' | 'peer.state' {
  const was = prev?.state ?? '';
  const up = (s: string) => s.startsWith('up');
  if (next.state === 'up.connected' && !up(was)) return 'peer.admitted';
  if (next.state === 'up.connected' && was === 'up.suspect') return 'peer.recovered';
  if (next.state === 'up.suspect') return 'peer.suspect';
  if (next.state.startsWith('gone') || next.state.startsWith('left')) return 'peer.gone';
  return 'peer.state';
}

/** The events that take a client from `prev` to `next` (requests excepted: the hub reports them as they come). */
export function diffMeshState(prev: MeshState, next: MeshState): MeshEventBody[] {
  const out: MeshEventBody[] = [];
  // The view.
  const before = new Map(prev.nodes.map((n) => [n.id, n]));
  for (const n of next.nodes) if (!same(before.get(n.id), n)) out.push({ type: 'node.seen', node: n });
  const now = new Set(next.nodes.map((n) => n.id));
  for (const n of prev.nodes) if (!now.has(n.id)) out.push({ type: 'node.forgotten', id: n.id });
  if (prev.self.role !== next.self.role) out.push({ type: 'self.role', role: next.self.role });
  // The peer machines and the links.
  for (const p of Object.values(next.peers)) {
    const old = prev.peers[p.id];
    if (old === undefined || old.state !== p.state) out.push({ type: peerEvent(old, p), peer: p });
    else if (old.name !== p.name || old.lastDown !== p.lastDown) out.push({ type: 'peer.state', peer: p });
    else if (old.link?.kind !== p.link?.kind || rttMoved(old.link?.rttMs ?? null, p.link?.rttMs ?? null)) out.push({ type: 'link.changed', peer: p.id, link: p.link });
  }
  for (const [id, p] of Object.entries(prev.peers)) if (next.peers[id] === undefined) out.push({ type: 'peer.removed', id: p.id });
  // The plan.
  if (!same(prev.plan, next.plan)) out.push({ type: 'plan.elected', plan: next.plan });
  if (prev.runningPlanId !== next.runningPlanId) out.push({ type: 'plan.running', planId: next.runningPlanId });
  // The machines and processes.
  for (const [machine, state] of Object.entries(next.machines)) {
    if (prev.machines[machine] !== state) out.push({ type: 'machine.state', machine, state });
  }
  const pr = next.processes;
  if (!same(prev.processes.rpcServer, pr.rpcServer)) out.push({ type: 'process.state', process: 'rpcServer', ...pr.rpcServer });
  if (!same(prev.processes.llamaServer, pr.llamaServer)) out.push({ type: 'process.state', process: 'llamaServer', ...pr.llamaServer });
  out.push(...llamaEvents(prev, next));
  // The tunnels' data paths.
  const key = (t: TunnelView) => `${t.peer} ${t.kind} ${t.side} ${t.path}`;
  const was = new Map(prev.tunnels.map((t) => [key(t), t]));
  const is = new Map(next.tunnels.map((t) => [key(t), t]));
  for (const [k, t] of is) if (!was.has(k)) out.push({ type: 'tunnel.path', tunnel: t });
  for (const [k, t] of was) if (!is.has(k)) out.push({ type: 'tunnel.closed', tunnel: t });
  return out;
}

/** llama-server's life in the words people use: spawning, loading (with percent), ready, crashed, stopped. */
function llamaEvents(prev: MeshState, next: MeshState): MeshEventBody[] {
  const was = prev.machines['llamaServer'] ?? '';
  const is = next.machines['llamaServer'] ?? '';
  const generation = next.processes.llamaServer.generation;
  const planId = next.load?.planId ?? next.runningPlanId;
  const percent = next.load?.generation === generation ? next.load.percent : null;
  const entered = (s: string) => is.startsWith(s) && !was.startsWith(s);
  if (entered('running.spawning') || (is.startsWith('running.spawning') && prev.processes.llamaServer.generation !== generation)) return [{ type: 'llama.spawning', planId, generation }];
  if (entered('running.loading') || (is.startsWith('running.loading') && prev.load?.percent !== next.load?.percent)) return [{ type: 'llama.loading', planId, generation, percent }];
  if (entered('running.ready')) return [{ type: 'llama.ready', planId, generation, port: next.processes.llamaServer.port }];
  if (entered('crashed')) return [{ type: 'llama.crashed', planId, generation, reason: next.lastCrash }];
  if (entered('stopped') && was !== '') return [{ type: 'llama.stopped', generation }];
  return [];
}

/** A machine's state value as one dotted string: "up.suspect", "running.ready", "idle". */
export function dottedState(value: unknown): string {
  if (value === null || value === undefined) return 'none';
  if (typeof value === 'string') return value;
  if (typeof value !== 'object') return String(value);
  return Object.entries(value as Record<string, unknown>)
    .map(([k, v]) => {
      const inner = dottedState(v);
      return inner === '' || (typeof v === 'object' && v !== null && Object.keys(v).length === 0) ? k : `${k}.${inner}`;
    })
    .join('|');
}
