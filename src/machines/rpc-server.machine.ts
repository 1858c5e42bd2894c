// Lifecycle of this node's ggml rpc-server (process-lifecycle.machine.ts): stopped -> spawning -> loading ->
// ready -> stopping, or crashed.
//
// Slots: rpcServerProcess (input RpcServerProcessInput) spawns `rpc-server` bound to 127.0.0.1 on an
// ephemeral port, and watches that it is not stopped (process.unresponsive: /proc says SIGSTOPped 3 probes
// in a row); waitRpcServerListening (input { port }) resolves once the port accepts connections;
// rpcServerBackoff (BackoffInput) waits out the back-off after it crashed again soon.
//
// Owner protocol: send `rpc.start` / `rpc.stop`; hears back on `notify`: `rpc.ready {port}`,
// `rpc.crashed {reason, crashes}`, `rpc.stopped` (also for a stop while already stopped or crashed, so an owner can
// always wait for it).
import { processLifecycleMachine, type ProcessLifecycleCommand } from './process-lifecycle.machine.ts';

export interface RpcServerProcessInput {
  /** 1 for the first start of this machine, then 2, 3...: tells the logs which run a process belongs to. */
  readonly run: number;
}

export type RpcServerCommand = ProcessLifecycleCommand<'rpc', object>;

/** What the owner hears. */
export type RpcServerNotice =
  | { readonly type: 'rpc.ready'; readonly port: number }
  | { readonly type: 'rpc.crashed'; readonly reason: string; readonly crashes: number }
  | { readonly type: 'rpc.stopped' };

export const rpcServerMachine = processLifecycleMachine({
  id: 'rpcServer',
  prefix: 'rpc',
  slots: { process: 'rpcServerProcess', ready: 'waitRpcServerListening', readyId: 'listening', backoff: 'rpcServerBackoff' },
  notReady: { failed: 'never listened', timedOut: 'did not listen within loadTimeout' },
  // An rpc-server listens within a second; much longer means it is wedged.
  timeoutsMs: { load: 30_000 },
  launch: (_start: object, previous: RpcServerProcessInput | null): RpcServerProcessInput => ({ run: (previous?.run ?? 0) + 1 }),
  // Every run is the same thing: one that keeps crashing backs off.
  runKey: () => 'rpc-server',
  notice: {
    ready: (c): RpcServerNotice => ({ type: 'rpc.ready', port: c.port ?? 0 }),
    crashed: (c): RpcServerNotice => ({ type: 'rpc.crashed', reason: c.crashReason ?? 'unknown', crashes: c.crashes }),
    stopped: (): RpcServerNotice => ({ type: 'rpc.stopped' }),
  },
});
