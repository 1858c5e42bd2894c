// Actor logic for the llama-server machine's slots (src/machines/llama-server.machine.ts): the process
// (llamaServerProcess) and the readiness wait (waitLlamaHealthy), over src/io/llama/llama-server-process.ts.
import { fromCallback, fromPromise } from 'xstate';
import type { LlamaServerProcessInput, ReadyPlan } from '../machines/llama-server.machine.ts';
import type { PlanStage } from '../machines/mesh-types.ts';
import type { ProcessEvent, ProcessKillCommand } from '../machines/process-slot.ts';
import {
  describeExit,
  launchLlamaServer,
  waitForHealth,
  type LlamaLoadProgress,
  type LlamaServerInit,
  type LlamaServerProcess,
} from '../io/llama/llama-server-process.ts';
import type { Logger } from '../io/host/logger.ts';
import { DEFAULT_STOP_GRACE_MS } from '../io/llama/processes.ts';
import { rpcDeviceCount } from '../io/llama/rpc-server-process.ts';

export interface LlamaServerActorConfig {
  readonly binary: string;
  /** This host's GGUF. */
  readonly model: string;
  /**
   * "127.0.0.1:PORT" through which llama-server reaches a remote stage's rpc-server: the local end of the
   * mesh's rpc tunnel to that peer. Called for every stage but the host's own.
   */
  readonly rpcAddressFor: (stage: PlanStage, plan: ReadyPlan) => string | Promise<string>;
  /**
   * Ask every rpc-server how many devices it exposes before launching (default true: one extra short
   * connection per stage, and `-dev`/the split stay right for multi-GPU workers). With false, one each.
   */
  readonly queryDeviceCounts?: boolean;
  readonly ctxSize?: number;
  readonly threads?: number;
  readonly parallel?: number;
  readonly flashAttention?: LlamaServerInit['flashAttention'];
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly launchTimeoutMs?: number;
  readonly killGraceMs?: number;
  readonly logger?: Logger;
  /** Load progress of the current generation (the status page shows it). */
  readonly onProgress?: (p: LlamaLoadProgress & { readonly planId: string; readonly generation: number }) => void;
  readonly onStarted?: (server: LlamaServerProcess, input: LlamaServerProcessInput) => void;
}

/**
 * The `--rpc` list and split of a plan: remote stages through their tunnels, the host's own rpc-server last;
 * with `deviceCount`, also how many devices each exposes (a multi-GPU worker's rpc-server has several, and
 * llama-server numbers RPC devices across all servers, so `-dev` and the split depend on it).
 */
export async function rpcLayout(
  input: LlamaServerProcessInput,
  rpcAddressFor: LlamaServerActorConfig['rpcAddressFor'],
  deviceCount?: (address: string) => Promise<number>,
): Promise<{ rpc: string[]; tensorSplit: number[]; devicesPerServer?: number[] }> {
  const { plan, ownRpcPort } = input;
  const last = plan.stages[plan.stages.length - 1];
  if (last === undefined || last.id !== plan.host) {
    throw new Error(`plan ${plan.id}: the host's own stage must come last (its rpc-server holds the output layer)`);
  }
  const rpc: string[] = [];
  for (const stage of plan.stages) {
    rpc.push(stage.id === plan.host ? `127.0.0.1:${ownRpcPort}` : await rpcAddressFor(stage, plan));
  }
  const tensorSplit = plan.stages.map((s) => s.share);
  if (deviceCount === undefined) return { rpc, tensorSplit };
  const devicesPerServer: number[] = [];
  for (const address of rpc) {
    const n = await deviceCount(address);
    if (n < 1) throw new Error(`the rpc-server at ${address} has no device`);
    devicesPerServer.push(n);
  }
  return { rpc, tensorSplit, devicesPerServer };
}

/**
 * The `llamaServerProcess` slot: launches llama-server for the plan and sends `process.spawned` once its
 * HTTP port is bound (it is still loading: the machine then waits with waitLlamaHealthy), `process.exited`
 * when it exits or cannot start (with the status and its last log lines). `process.kill` stops it; so does
 * the cleanup (SIGKILL after the grace).
 */
export function llamaServerProcessLogic(config: LlamaServerActorConfig) {
  return fromCallback<ProcessKillCommand, LlamaServerProcessInput>(({ input, sendBack, receive }) => {
    const log = config.logger?.child({ plan: input.plan.id, generation: input.generation });
    const send = (event: ProcessEvent) => sendBack(event);
    const grace = config.killGraceMs ?? DEFAULT_STOP_GRACE_MS;
    const ctrl = new AbortController();
    let server: LlamaServerProcess | null = null;
    let cleanedUp = false;

    (async () => {
      const layout = await rpcLayout(input, config.rpcAddressFor, config.queryDeviceCounts === false ? undefined : (a) => rpcDeviceCount(a));
      ctrl.signal.throwIfAborted();
      return launchLlamaServer({
        binary: config.binary,
        model: config.model,
        ...layout,
        ctxSize: config.ctxSize,
        threads: config.threads,
        parallel: config.parallel,
        alias: input.plan.model.name,
        flashAttention: config.flashAttention,
        extraArgs: config.extraArgs,
        env: config.env,
        launchTimeoutMs: config.launchTimeoutMs,
        logger: log,
        signal: ctrl.signal,
        onProgress: (p) => {
          log?.info({ phase: p.phase, fraction: p.fraction }, 'llama-server load progress');
          config.onProgress?.({ ...p, planId: input.plan.id, generation: input.generation });
        },
      });
    })().then(
      (s) => {
        if (cleanedUp) {
          void s.stop(grace);
          return;
        }
        server = s;
        config.onStarted?.(s, input);
        send({ type: 'process.spawned', pid: s.process.pid, port: s.port });
        void s.exited.then((exit) => {
          if (cleanedUp) return;
          const reason = describeExit(exit, exit.requested ? 'after a stop request' : 'on its own');
          if (!exit.requested) log?.error({ code: exit.code, signal: exit.signal, tail: exit.tail.slice(-20) }, reason);
          send({ type: 'process.exited', code: exit.code, signal: exit.signal, reason });
        });
      },
      (err: unknown) => {
        if (cleanedUp) return;
        log?.error({ err }, 'llama-server could not start');
        send({ type: 'process.exited', code: null, signal: null, reason: (err as Error).message });
      },
    );

    receive((event) => {
      if (event.type !== 'process.kill') return;
      if (server !== null) void server.stop(grace);
      else ctrl.abort(new Error('stopped while starting'));
    });

    return () => {
      cleanedUp = true;
      ctrl.abort(new Error('actor stopped'));
      if (server !== null) void server.stop(grace);
    };
  });
}

/** The `waitLlamaHealthy` slot: polls /health on the port until 200; the machine bounds it and aborts it. */
export const waitLlamaHealthyLogic = fromPromise<void, { port: number }>(async ({ input, signal }) => {
  // No timeout of its own: the machine's loadTimeout bounds it, and a crash arrives as process.exited.
  await waitForHealth(`http://127.0.0.1:${input.port}`, { signal, timeoutMs: Number.MAX_SAFE_INTEGER, intervalMs: 200 });
});
