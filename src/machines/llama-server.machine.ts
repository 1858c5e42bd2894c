// Lifecycle of the host's llama-server for one plan (process-lifecycle.machine.ts): stopped -> spawning ->
// loading -> ready -> stopping, or crashed.
//
// Slots: llamaServerProcess (input LlamaServerProcessInput) spawns `llama-server` on an ephemeral loopback
// port with `--rpc` = one local tunnel port per remote stage of `plan` (in the plan's order) and then
// `127.0.0.1:ownRpcPort` last, `--tensor-split` from the shares, every layer offloaded, no mmap,
// `--cache-ram 0`, and probes `GET /health` every 2 s (process.unresponsive after 3 unanswered: a SIGSTOPped or
// wedged llama-server); waitLlamaHealthy (input { port }) resolves once `GET /health` answers ok;
// llamaServerBackoff (BackoffInput) waits out the back-off after the same plan crashed again.
//
// Owner protocol: send `llama.start {plan, generation, ownRpcPort}` / `llama.stop`; hears back on `notify`:
// `llama.ready {port, planId, generation}`, `llama.crashed {reason, planId, crashes}` (crashes: of this plan in
// a row, this one included), `llama.stopped {planId}` (also for a stop while already stopped or crashed).
import type { Plan } from './mesh-types.ts';
import { processLifecycleMachine, type ProcessLifecycleCommand } from './process-lifecycle.machine.ts';

export type ReadyPlan = Extract<Plan, { kind: 'ready' }>;

export interface LlamaServerProcessInput {
  readonly plan: ReadyPlan;
  /** How many llama-servers this host has started so far, this one included (1, 2, ...). */
  readonly generation: number;
  /** Port of the host's own rpc-server on 127.0.0.1: the last `--rpc` entry. */
  readonly ownRpcPort: number;
}

export type LlamaServerCommand = ProcessLifecycleCommand<'llama', LlamaServerProcessInput>;

/** What the owner hears. */
export type LlamaServerNotice =
  | { readonly type: 'llama.ready'; readonly port: number; readonly planId: string; readonly generation: number }
  | { readonly type: 'llama.crashed'; readonly reason: string; readonly planId: string | null; readonly crashes: number }
  | { readonly type: 'llama.stopped'; readonly planId: string | null };

export const llamaServerMachine = processLifecycleMachine({
  id: 'llamaServer',
  prefix: 'llama',
  slots: { process: 'llamaServerProcess', ready: 'waitLlamaHealthy', readyId: 'healthy', backoff: 'llamaServerBackoff' },
  notReady: { failed: 'never became healthy', timedOut: 'did not become healthy within loadTimeout' },
  // Loading a big model from local disk takes minutes on slow disks; beyond this it is wedged.
  timeoutsMs: { load: 10 * 60_000 },
  launch: (start: LlamaServerProcessInput): LlamaServerProcessInput => ({ plan: start.plan, generation: start.generation, ownRpcPort: start.ownRpcPort }),
  // The same plan crashing again backs off; a new plan starts at once.
  runKey: (launch) => launch.plan.id,
  notice: {
    ready: (c): LlamaServerNotice => ({ type: 'llama.ready', port: c.port ?? 0, planId: c.launch?.plan.id ?? '', generation: c.launch?.generation ?? 0 }),
    crashed: (c): LlamaServerNotice => ({ type: 'llama.crashed', reason: c.crashReason ?? 'unknown', planId: c.launch?.plan.id ?? null, crashes: c.crashes }),
    stopped: (c): LlamaServerNotice => ({ type: 'llama.stopped', planId: c.launch?.plan.id ?? null }),
  },
});
