// The host's verdict on a stage that stopped answering (issue 12, item 2a). Pure.
//
// The host's tunnels watch every rpc connection of its llama-server (src/io/transport/tunnel-watch.ts) and
// report `stage.hung` when a request has owed a reply for max(15 s, 20 x p99 of that worker's reply times)
// with no reply byte. llama.cpp's RPC client would wait forever, so:
//
//   1st strike  the worker becomes a *suspect* for the running plan, and llama-server is stopped (the request
//               in flight ends) and started again for the same plan. That restart is the probe: before it
//               launches, llama-server's actor asks every rpc-server for its device count (bounded), and the
//               launch then loads through every stage.
//   cleared     llama-server gets ready again: every stage answered. The suspect is forgotten.
//   2nd strike  the restarted llama-server crashes or hangs again while a suspect stands: the suspect is
//               *quarantined*: this host stops announcing it in `connectedTo`, so every node's election (which
//               takes only workers mutually connected with the host) plans without it, the same plan
//               everywhere. The control link and heartbeats stay: the node itself is alive.
//   released    after QUARANTINE_MS the host announces it again and the election may take it back; by then the
//               worker has stopped its old rpc-server (its plan changed) and starts a fresh one.
import type { EndpointId } from './mesh-types.ts';
import type { NodeContext } from './node-context.ts';
import { remoteWorkers } from './node-plan.ts';

/** From the tunnels: an rpc tunnel to `id` owed a reply for `waitedMs` (the bound was `boundMs`). */
export interface StageHungEvent {
  readonly type: 'stage.hung';
  readonly id: EndpointId;
  /** The plan the hung connection's llama-server ran (the listener's plan id). */
  readonly planId: string | null;
  readonly waitedMs: number;
  readonly boundMs: number;
}

/** Raised by the node machine itself, QUARANTINE_MS after a quarantine began. */
export interface QuarantineOverEvent {
  readonly type: 'stage.quarantine.over';
  readonly id: EndpointId;
}

/** How long a stage that stayed silent is left out of this host's plans before it may be tried again. */
export const QUARANTINE_MS = 30_000;

/** What a `stage.hung` report means for this node now. */
export function hungVerdict(context: Pick<NodeContext, 'running' | 'self' | 'suspects' | 'quarantined'>, event: StageHungEvent): 'ignore' | 'suspect' | 'quarantine' {
  const plan = context.running;
  if (plan === null || plan.kind !== 'ready' || plan.host !== context.self.id) return 'ignore';
  if (event.planId !== plan.id || !remoteWorkers(plan).includes(event.id)) return 'ignore'; // an old llama-server's connection
  if (context.quarantined.includes(event.id)) return 'ignore';
  return context.suspects[event.id] === plan.id ? 'quarantine' : 'suspect';
}

/** The suspects of the running plan: the ones a failed restart quarantines. */
export function suspectsOfRunningPlan(context: Pick<NodeContext, 'running' | 'suspects'>): EndpointId[] {
  const planId = context.running?.id;
  return Object.entries(context.suspects)
    .filter(([, p]) => p === planId)
    .map(([id]) => id as EndpointId);
}
