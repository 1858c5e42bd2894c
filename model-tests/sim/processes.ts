// The simulator's fake process table and the fake actors that fill the machines' process slots. It records
// what really ran (spawns, kills, crashes, which llama-server is connected to which rpc-server) and plays the
// parts of llama.cpp that matter to the mesh: llama-server dials every rpc-server of its plan through the
// tunnels (which admit what the product's tunnelDecision admits, host and plan id) and dies when one of them
// vanishes.
import { fromCallback, type ActorLogic, type EventObject, type PromiseActorLogic, type Snapshot } from 'xstate';
import type { LlamaServerProcessInput } from '../../src/machines/llama-server.machine.ts';
import type { EndpointId, PlanStage } from '../../src/machines/mesh-types.ts';
import type { BackoffInput, ProcessEvent, ProcessKillCommand } from '../../src/machines/process-slot.ts';
import type { RpcServerProcessInput } from '../../src/machines/rpc-server.machine.ts';
import type { TunnelDecision } from '../../src/machines/tunnel-policy.ts';
import type { SimScheduler } from './scheduler.ts';

export type ProcessKind = 'rpc' | 'llama';
export type EndHow = 'kill' | 'crash' | 'cleanup' | 'node-crash';

export interface ProcRecord {
  readonly pid: number;
  readonly port: number;
  readonly node: EndpointId;
  readonly kind: ProcessKind;
  readonly spawnedAt: number;
  /** llama-server only: what its command line says. */
  readonly planId: string | null;
  readonly stages: readonly PlanStage[];
  readyAt: number | null;
  endedAt: number | null;
  end: EndHow | null;
  /** rpc-server: pids of the llama-servers connected to it. llama-server: pids of its rpc-servers. */
  readonly peers: Set<number>;
  /** How to tell the owning actor that its process exited on its own. */
  onExit: ((reason: string) => void) | null;
}

/** What the fakes need to know about the world outside the table. */
export interface TunnelWorld {
  /**
   * What a worker's tunnel layer answers an rpc stream from `host` that carries `planId` (the plan of the
   * host's llama-server, as the product's host sends it when it opens the stream): the product's tunnelDecision.
   */
  rpcDecision(worker: EndpointId, host: EndpointId, planId: string | null): TunnelDecision;
  /** Whether a connection between the two nodes is open and can carry bytes. */
  canTunnel(a: EndpointId, b: EndpointId): boolean;
  /** Called when a llama-server connects to an rpc-server, before it is recorded: the checker's hook. */
  onConnect(llama: ProcRecord, rpc: ProcRecord): void;
  /** Called when a process is spawned, after it is recorded: the checker's hook. */
  onSpawn(p: ProcRecord): void;
}

export interface FakeTimings {
  spawnMs: number;
  rpcListenMs: number;
  llamaLoadMs: number;
  exitMs: number;
}

export const DEFAULT_TIMINGS: FakeTimings = { spawnMs: 5, rpcListenMs: 20, llamaLoadMs: 300, exitMs: 10 };

export class ProcessTable {
  readonly all: ProcRecord[] = [];
  private readonly live = new Map<number, ProcRecord>();
  private nextPid = 1000;
  /** Every change to the table, for convergence timing. */
  lastChangeAt = 0;

  constructor(
    private readonly sched: SimScheduler,
    private readonly world: TunnelWorld,
    readonly timings: FakeTimings = DEFAULT_TIMINGS,
  ) {}

  spawn(node: EndpointId, kind: ProcessKind, plan?: { planId: string; stages: readonly PlanStage[] }): ProcRecord {
    const pid = this.nextPid++;
    const p: ProcRecord = {
      pid,
      port: 20000 + (pid % 40000),
      node,
      kind,
      spawnedAt: this.sched.now(),
      planId: plan?.planId ?? null,
      stages: plan?.stages ?? [],
      readyAt: null,
      endedAt: null,
      end: null,
      peers: new Set(),
      onExit: null,
    };
    this.all.push(p);
    this.live.set(pid, p);
    this.lastChangeAt = this.sched.now();
    this.world.onSpawn(p);
    return p;
  }

  isLive(p: ProcRecord): boolean {
    return p.endedAt === null;
  }

  liveOf(node: EndpointId, kind?: ProcessKind): ProcRecord[] {
    const out: ProcRecord[] = [];
    for (const p of this.live.values()) if (p.node === node && (kind === undefined || p.kind === kind)) out.push(p);
    return out;
  }

  liveAll(): ProcRecord[] {
    return [...this.live.values()];
  }

  byPort(port: number): ProcRecord | undefined {
    for (const p of this.live.values()) if (p.port === port) return p;
    return undefined;
  }

  /** Ends a process. Its connections go with it; a llama-server whose rpc-server vanished aborts. */
  end(p: ProcRecord, how: EndHow, reason: string): void {
    if (p.endedAt !== null) return;
    p.endedAt = this.sched.now();
    p.end = how;
    this.live.delete(p.pid);
    this.lastChangeAt = this.sched.now();
    const notify = p.onExit;
    p.onExit = null;
    if (how === 'crash' && notify !== null) notify(reason);
    for (const peerPid of p.peers) {
      const other = this.all.find((x) => x.pid === peerPid);
      if (other === undefined) continue;
      other.peers.delete(p.pid);
      if (p.kind === 'rpc' && other.kind === 'llama') this.crashSoon(other, `rpc-server ${p.node}:${p.port} went away`);
    }
    p.peers.clear();
  }

  /** A process dies on its own (the owning actor hears `process.exited`). */
  crashSoon(p: ProcRecord, reason: string): void {
    this.sched.setTimeout(() => this.end(p, 'crash', reason), this.timings.exitMs);
  }

  /** Connections ride on tunnels: when one can no longer carry bytes, the llama-server on it aborts. */
  dropTunnelsBetween(a: EndpointId, b: EndpointId): void {
    for (const p of this.live.values()) {
      if (p.kind !== 'llama' || (p.node !== a && p.node !== b)) continue;
      const other = p.node === a ? b : a;
      for (const rpcPid of p.peers) {
        const rpc = this.live.get(rpcPid);
        if (rpc !== undefined && rpc.node === other) this.crashSoon(p, `tunnel to ${other} closed`);
      }
    }
  }

  /** The hand-off: the worker's tunnel layer closes every rpc tunnel of `host` (its policy left that host or plan). */
  closeRpcTunnelsOf(worker: EndpointId, host: EndpointId): void {
    for (const rpc of this.liveOf(worker, 'rpc')) {
      for (const llamaPid of rpc.peers) {
        const llama = this.live.get(llamaPid);
        if (llama !== undefined && llama.node === host) this.crashSoon(llama, `tunnel to ${worker} closed by its hand-off`);
      }
    }
  }

  /** Connects a llama-server to every rpc-server of its plan, in order; the first failure aborts it. */
  connect(llama: ProcRecord, ignorePolicy: boolean): string | null {
    for (const stage of llama.stages) {
      const rpcs = this.liveOf(stage.id, 'rpc').filter((r) => r.readyAt !== null);
      let rpc = rpcs[0];
      if (rpc === undefined) return `no rpc-server listening on ${stage.id}`;
      if (stage.id !== llama.node) {
        if (!this.world.canTunnel(llama.node, stage.id)) return `no connection to ${stage.id}`;
        if (!ignorePolicy) {
          // The product's rule: the worker admits its policy's host, and only for its policy's plan: the stream
          // carries the plan id of the llama-server that opens it (protocol 2), as the product's host sends it.
          const decision = this.world.rpcDecision(stage.id, llama.node, llama.planId);
          if ('refuse' in decision) return `${stage.id} refused the rpc tunnel: ${decision.refuse}`;
          if (!('port' in decision)) return `${stage.id} sent an rpc tunnel to a socket path`;
          rpc = rpcs.find((r) => r.port === decision.port);
          if (rpc === undefined) return `nothing listens on ${stage.id}:${decision.port}`;
        }
      }
      this.world.onConnect(llama, rpc);
      rpc.peers.add(llama.pid);
      llama.peers.add(rpc.pid);
    }
    return null;
  }
}

/** Knobs a test turns to plant a bug in the world around the machines (never in the machines' code). */
export interface WorldMutants {
  /** The tunnel layer admits any host and any plan, whatever the node's policy says. */
  tunnelIgnoresPolicy?: boolean;
}

/** The four process slots of one node, played against the table. */
export function fakeProcessSlots(node: EndpointId, table: ProcessTable, sched: SimScheduler, mutants: WorldMutants = {}) {
  const t = table.timings;

  const processActor = <TInput extends RpcServerProcessInput | LlamaServerProcessInput>(kind: ProcessKind) =>
    fromCallback<ProcessKillCommand, TInput>(({ sendBack, receive, input }) => {
      const plan = 'plan' in input ? input.plan : null;
      const p = table.spawn(node, kind, plan === null ? undefined : { planId: plan.id, stages: plan.stages });
      let stopped = false;
      const send = (e: ProcessEvent) => {
        if (!stopped) sendBack(e);
      };
      p.onExit = (reason) => send({ type: 'process.exited', code: 1, signal: null, reason });
      sched.setTimeout(() => {
        if (!table.isLive(p)) return;
        send({ type: 'process.spawned', pid: p.pid, port: p.port });
        if (kind === 'llama') {
          const failure = table.connect(p, mutants.tunnelIgnoresPolicy === true);
          if (failure !== null) table.crashSoon(p, failure);
        }
      }, t.spawnMs);
      receive(() => {
        // SIGTERM: the process exits after a moment, and says so.
        sched.setTimeout(() => {
          if (!table.isLive(p)) return;
          p.onExit = null;
          table.end(p, 'kill', 'SIGTERM');
          send({ type: 'process.exited', code: null, signal: 'SIGTERM', reason: 'terminated' });
        }, t.exitMs);
      });
      return () => {
        stopped = true;
        table.end(p, 'cleanup', 'owner stopped');
      };
    });

  // Becomes ready after `ms` if the process on that port is still alive; fails otherwise.
  const waitReady = (ms: number) =>
    scheduledResult<{ port: number }>(sched, ms, (input) => {
      const p = table.byPort(input.port);
      if (p === undefined) return new Error(`nothing listens on ${input.port}`);
      p.readyAt = sched.now();
      table.lastChangeAt = sched.now();
      return null;
    });

  // The crash back-off on the simulated timeline (the product's slot holds the wall clock and a log line).
  const backoff = fromCallback<EventObject, BackoffInput>(({ sendBack, input }) => {
    sendBack({ type: 'backoff.scheduled', nextAttemptAt: sched.now() + input.delayMs });
    const timer = sched.setTimeout(() => sendBack({ type: 'backoff.elapsed' }), input.delayMs);
    return () => sched.clearTimeout(timer);
  });

  return {
    rpc: { rpcServerProcess: processActor<RpcServerProcessInput>('rpc'), waitRpcServerListening: waitReady(t.rpcListenMs), rpcServerBackoff: backoff },
    llama: { llamaServerProcess: processActor<LlamaServerProcessInput>('llama'), waitLlamaHealthy: waitReady(t.llamaLoadMs), llamaServerBackoff: backoff },
  };
}

type ResultSnapshot = Snapshot<void> & { input: unknown };
type ResultEvent = { type: 'settle'; error: Error | null };

/**
 * Promise-shaped actor logic on the simulated timeline: after `ms` it completes (onDone) or fails (onError)
 * as `check` says. A real `fromPromise` would settle on the microtask queue, outside the shared clock.
 */
export function scheduledResult<TInput>(
  sched: SimScheduler,
  ms: number,
  check: (input: TInput) => Error | null,
): PromiseActorLogic<void, TInput> {
  const logic: ActorLogic<ResultSnapshot, ResultEvent, TInput> = {
    config: 'scheduledResult',
    transition: (snapshot, event) => {
      // XState delivers `xstate.stop` when the owner leaves the state: a later timer must find it stopped.
      if ((event as { type: string }).type === 'xstate.stop') return { ...snapshot, status: 'stopped' } as ResultSnapshot;
      if (snapshot.status !== 'active' || event.type !== 'settle') return snapshot;
      return event.error === null
        ? { ...snapshot, status: 'done', output: undefined }
        : { ...snapshot, status: 'error', error: event.error };
    },
    getInitialSnapshot: (_scope, input) => ({ status: 'active', output: undefined, error: undefined, input }),
    start: (snapshot, { self }) => {
      sched.setTimeout(() => {
        if (self.getSnapshot().status !== 'active') return;
        self.send({ type: 'settle', error: check(snapshot.input as TInput) });
      }, ms);
    },
    getPersistedSnapshot: (s) => s,
  };
  // It completes and fails exactly as promise logic does (status done / error), so it fills promise slots.
  return logic as unknown as PromiseActorLogic<void, TInput>;
}
