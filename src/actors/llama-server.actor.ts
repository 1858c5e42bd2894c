// Actor logic for the llama-server machine's slots (src/machines/llama-server.machine.ts): the process
// (llamaServerProcess, a process.actor.ts over src/io/llama/llama-server-process.ts) and the readiness wait
// (waitLlamaHealthy).
import { fromPromise } from 'xstate';
import type { LlamaServerProcessInput, ReadyPlan } from '../machines/llama-server.machine.ts';
import type { EndpointId, PlanStage } from '../machines/mesh-types.ts';
import { describeExit, type LlamaLoadProgress, WeightsOverWireTally, type WeightsOverWire } from '../io/llama/llama-server-output.ts';
import { launchLlamaServer, waitForHealth, type LlamaServerInit, type LlamaServerProcess } from '../io/llama/llama-server-process.ts';
import type { Logger } from '../io/host/logger.ts';
import { rpcDeviceCount } from '../io/llama/rpc-server-process.ts';
import { LIVENESS_INTERVAL_MS, LIVENESS_MISSES, llamaServerAlive } from '../io/llama/liveness.ts';
import { processActorLogic, type Liveness } from './process.actor.ts';

/** The launch settings of every generation (binary, model, threads...); the plan gives `--rpc` and the split. */
export type LlamaServerActorConfig = Pick<
  LlamaServerInit,
  'binary' | 'model' | 'ctxSize' | 'threads' | 'parallel' | 'flashAttention' | 'extraArgs' | 'env' | 'launchTimeoutMs'
> & {
  /**
   * "127.0.0.1:PORT" through which llama-server reaches a remote stage's rpc-server: the local end of the
   * mesh's rpc tunnel to that peer for `plan` (its connections tell the worker the plan id). Called for every
   * stage but the host's own.
   */
  readonly rpcAddressFor: (stage: PlanStage, plan: ReadyPlan) => string | Promise<string>;
  /**
   * A worker's data port that llama-server may dial with TLS itself (patch 0003), asked right before each
   * launch, after the device-count query has gone through `rpcAddressFor`; null: stay on `rpcAddressFor`. The
   * key is bound to `plan` (the worker refuses it for another plan).
   */
  readonly directRpcFor?: (stage: PlanStage, plan: ReadyPlan) => Promise<{ readonly address: string; readonly keyLine: string } | null>;
  /**
   * Ask every rpc-server how many devices it exposes before launching (default true: one extra short
   * connection per stage, and `-dev`/the split stay right for multi-GPU workers). With false, one each.
   */
  readonly queryDeviceCounts?: boolean;
  /** SIGTERM -> SIGKILL grace on stop (default 5 s). */
  readonly killGraceMs?: number;
  /** GET /health every 2 s, 3 unanswered (2 s each) in a row: unresponsive (default; tests may tighten it). */
  readonly liveness?: Pick<Liveness<LlamaServerProcess>, 'intervalMs' | 'misses'>;
  readonly logger?: Logger;
  /** Load progress of the current generation (the status page shows it). */
  readonly onProgress?: (p: LlamaLoadProgress & { readonly planId: string; readonly generation: number }) => void;
  readonly onStarted?: (server: LlamaServerProcess, input: LlamaServerProcessInput) => void;
  /**
   * Weights llama-server sent as bytes to a stage's rpc-server because it refused to load them from its own
   * GGUF (patch 0001), by stage id, for the current generation: called with none at each launch, then at every
   * such weight. The host also logs one warning per stage once the model is loaded.
   */
  readonly onWeightsOverWire?: (w: WeightsOverWireReport) => void;
};

export interface WeightsOverWireReport {
  readonly planId: string;
  readonly generation: number;
  readonly byStage: Readonly<Record<EndpointId, WeightsOverWire>>;
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
 * HTTP port is bound (it is still loading: the machine then waits with waitLlamaHealthy); the rest as
 * process.actor.ts says (an exit's reason carries the status and its last log lines).
 */
export function llamaServerProcessLogic(config: LlamaServerActorConfig) {
  const { rpcAddressFor, directRpcFor, queryDeviceCounts, killGraceMs, liveness, logger, onProgress, onStarted, onWeightsOverWire, ...launch } = config;
  // A launch that dialed workers over TLS itself and died before it was ready (a handshake that fails, say)
  // must not repeat the same choice forever: the next launch uses the node's relay instead, once.
  let relayNextLaunch = false;
  return processActorLogic<LlamaServerProcessInput, LlamaServerProcess>({
    name: 'llama-server',
    logger,
    killGraceMs,
    logFields: (input) => ({ plan: input.plan.id, generation: input.generation }),
    // /health answers from llama-server's HTTP threads, during a prefill too: no answer means stopped or wedged.
    liveness: {
      probe: (server, signal) => llamaServerAlive(server.url, server.process.pid, signal),
      intervalMs: liveness?.intervalMs ?? LIVENESS_INTERVAL_MS,
      misses: liveness?.misses ?? LIVENESS_MISSES,
    },
    start: async (input, signal, log) => {
      const layout = await rpcLayout(input, rpcAddressFor, queryDeviceCounts === false ? undefined : (a) => rpcDeviceCount(a));
      signal.throwIfAborted();
      const tlsKeys: string[] = [];
      const useRelay = relayNextLaunch;
      relayNextLaunch = false;
      if (directRpcFor !== undefined && !useRelay) {
        for (const [i, stage] of input.plan.stages.entries()) {
          if (stage.id === input.plan.host) continue;
          const direct = await directRpcFor(stage, input.plan);
          if (direct === null) continue;
          layout.rpc[i] = direct.address;
          tlsKeys.push(direct.keyLine);
        }
        if (tlsKeys.length > 0) log?.info({ stages: tlsKeys.length }, 'llama-server dials these workers over TLS itself (no Node relay on this end)');
      }
      signal.throwIfAborted();
      const overWire = weightsOverWireOf(input, layout.rpc, onWeightsOverWire);
      let ready = false;
      const server = await launchLlamaServer({
        ...launch,
        ...layout,
        tlsKeys,
        alias: input.plan.model.name,
        logger: log,
        signal,
        onWeightsSentAsBytes: (w) => overWire.add(w.endpoint, w),
        onProgress: (p) => {
          if (p.phase === 'ready') ready = true;
          log?.info({ phase: p.phase, fraction: p.fraction }, 'llama-server load progress');
          if (p.phase === 'ready') overWire.warn(log);
          onProgress?.({ ...p, planId: input.plan.id, generation: input.generation });
        },
      });
      if (tlsKeys.length > 0) {
        void server.exited.then((exit) => {
          if (ready || exit.requested) return;
          relayNextLaunch = true;
          log?.warn('llama-server died before it was ready while dialing workers over TLS itself: the next launch goes through the node relay');
        });
      }
      return server;
    },
    exitReason: (exit, log) => {
      const reason = describeExit(exit, exit.requested ? 'after a stop request' : 'on its own');
      if (!exit.requested) log?.error({ code: exit.code, signal: exit.signal, tail: exit.tail.slice(-20) }, reason);
      return reason;
    },
    onStarted,
  });
}

/**
 * One generation's weights sent as bytes, by the stage behind each `--rpc` endpoint: reported (reset first)
 * through `report`, and warned about once per stage when the model is loaded. Never silent: a weight that
 * crosses the network though the worker has the model file means a wrong or different file there.
 */
function weightsOverWireOf(input: LlamaServerProcessInput, rpc: readonly string[], report: LlamaServerActorConfig['onWeightsOverWire']) {
  const { plan, generation } = input;
  const stageOf = new Map(rpc.map((address, i) => [address, plan.stages[i]?.id ?? address]));
  const tally = new WeightsOverWireTally();
  const emit = () => report?.({ planId: plan.id, generation, byStage: tally.snapshot() });
  emit();
  let warned = false;
  return {
    add(endpoint: string, w: { readonly name: string; readonly bytes: number }) {
      tally.add(stageOf.get(endpoint) ?? endpoint, w);
      emit();
    },
    warn(log: Logger | undefined) {
      if (warned) return;
      warned = true;
      for (const [stage, w] of Object.entries(tally.snapshot())) {
        const endpoint = rpc[plan.stages.findIndex((s) => s.id === stage)] ?? stage;
        const to = stage === plan.host ? 'this host\'s own rpc-server' : stage;
        const mib = (w.bytes / (1024 * 1024)).toFixed(1);
        log?.warn(
          { worker: stage, endpoint, tensors: w.tensors, bytes: w.bytes, names: w.names },
          `weights crossed the network to ${to}: ${w.tensors} tensors, ${mib} MiB (first: ${w.names.slice(0, 3).join(', ')}${w.tensors > 3 ? ', ...' : ''}); its GGUF refused them (another model file?)`,
        );
      }
    },
  };
}

/** The `waitLlamaHealthy` slot: polls /health on the port until 200; the machine bounds it and aborts it. */
export const waitLlamaHealthyLogic = fromPromise<void, { port: number }>(async ({ input, signal }) => {
  // No timeout of its own: the machine's loadTimeout bounds it, and a crash arrives as process.exited.
  await waitForHealth(`http://127.0.0.1:${input.port}`, { signal, timeoutMs: Number.MAX_SAFE_INTEGER, intervalMs: 200 });
});
