// The real parts of a node, made from the command line: what it holds (model, VRAM, key, binaries), its
// process slots (rpc-server and llama-server processes), and its inspector. `startNode` hands them to
// `buildNode`; tests hand it parts of their own.
import { createSkyInspector, createWebSocketInspector } from '@statelyai/inspect';
import { llamaServerProcessLogic, waitLlamaHealthyLogic, type WeightsOverWireReport } from '../actors/llama-server.actor.ts';
import { backoffLogic } from '../actors/process.actor.ts';
import { rpcServerProcessLogic, waitRpcServerListeningLogic } from '../actors/rpc-server.actor.ts';
import type { CliOptions } from '../io/host/cli-args.ts';
import { componentLogger, type Logger } from '../io/host/logger.ts';
import { meshMemoryPath, readMeshMemory } from '../io/host/mesh-memory.ts';
import { loadOrCreateSecretKey } from '../io/host/secret-key.ts';
import { detectVram, formatBytes } from '../io/host/vram.ts';
import { readModelIdentity } from '../io/gguf/gguf-identity.ts';
import { readModelShape } from '../io/gguf/gguf-shape.ts';
import { DEFAULT_SERVE, describeServe, kvSizing, type ServeSettings } from '../machines/kv-cache.ts';
import { findLlamaBinaries, type LlamaBinaries } from '../io/llama/llama-binaries.ts';
import { llamaServerMachine } from '../machines/llama-server.machine.ts';
import { rpcServerMachine } from '../machines/rpc-server.machine.ts';
import type { NodeHoldings, NodeInspector, NodeMeshMemory, NodeProcessSlots } from './build.ts';
import type { LoadProgress } from './event-hub.ts';
import { sanitizeForInspector } from './status.ts';

/** SIGTERM -> SIGKILL grace for llama-server (see where it is used). */
const LLAMA_KILL_GRACE_MS = 1_000;

/** What this node holds, read (and logged) before it is built. A lite client holds no model and no binaries. */
export async function readHoldings(
  options: CliOptions,
  logger: Logger,
): Promise<NodeHoldings & { readonly binaries: LlamaBinaries | null; readonly memory: NodeMeshMemory }> {
  const log = componentLogger(logger, 'node');
  const isClient = options.role === 'client' || options.model === null;
  const model = isClient ? null : await readModelIdentity(options.model!);
  // The KV cache of the plans this node would host, announced for the election (src/machines/kv-cache.ts).
  const kv = isClient ? null : kvSizing(await readModelShape(options.model!), options.serve);
  const vram = isClient ? null : await detectVram({ maxVramBytes: options.maxVramBytes });
  const binaries = isClient ? null : await findLlamaBinaries();
  if (model !== null) log.info({ model: model.name, bytes: model.bytes, fingerprint: model.fingerprint }, `model ${model.name} (${formatBytes(model.bytes)})`);
  if (kv !== null) log.info({ kvBytes: kv.bytes, ctxSize: kv.ctxSize, parallel: kv.parallel, cacheType: kv.cacheType, flashAttn: kv.flashAttn }, `KV cache when hosting: ${formatBytes(kv.bytes)} (${describeServe(kv)})`);
  if (vram !== null) log.info({ bytes: vram.bytes, source: vram.source }, `offering ${formatBytes(vram.bytes)} (${vram.detail})`);
  if (binaries !== null) log.info({ dir: binaries.dir, patches: binaries.patches }, 'llama.cpp binaries');
  const { key: secretKey, path: keyPath } = await loadOrCreateSecretKey({ keyFile: options.keyFile ?? undefined });
  // The key file's mesh file: the mesh this identity belongs to (src/io/host/mesh-memory.ts).
  const memoryPath = meshMemoryPath(keyPath);
  const memory = { path: memoryPath, remembered: await readMeshMemory(memoryPath) };
  return { secretKey, model, vram, kv, binaries, memory };
}

/** The rpc-server and llama-server slots of the node machine, over the real processes; none without binaries. */
export function processSlots(
  options: Pick<CliOptions, 'model'>,
  tuning: { readonly threads?: number; readonly serve?: ServeSettings },
  binaries: LlamaBinaries | null,
  logger: Logger,
): NodeProcessSlots {
  // A lite client never runs either process: its slots keep the defaults, which fail loudly if ever asked.
  if (binaries === null) return () => ({});
  // ggml's abort handler attaches gdb for a backtrace: seconds during which a crash is not yet an exit (and
  // llama-server aborts whenever an rpc-server goes away under it). MESH_INFERENCE_BACKTRACE=1 keeps it.
  const crashEnv: Record<string, string> = process.env['MESH_INFERENCE_BACKTRACE'] === '1' ? {} : { GGML_NO_BACKTRACE: '1' };
  // The current llama-server generation's weights sent as bytes after a GGUF refusal (/api/status).
  let overWire: WeightsOverWireReport['byStage'] = {};
  // The current generation's load progress (the console's events).
  let progress: LoadProgress | null = null;
  return (tunnels) => ({
    weightsOverWire: () => overWire,
    loadProgress: () => progress,
    rpcServer: rpcServerMachine.provide({
      actors: {
        rpcServerProcess: rpcServerProcessLogic({
          binary: binaries.rpcServer,
          gguf: options.model,
          ggufSupported: binaries.setTensorGguf,
          threads: tuning.threads,
          env: crashEnv,
          logger: componentLogger(logger, 'rpc-server'),
        }),
        waitRpcServerListening: waitRpcServerListeningLogic,
        rpcServerBackoff: backoffLogic(componentLogger(logger, 'rpc-server')),
      },
    }),
    llamaServer: llamaServerMachine.provide({
      actors: {
        llamaServerProcess: llamaServerProcessLogic({
          binary: binaries.llamaServer,
          model: options.model!,
          rpcAddressFor: (stage, plan) => tunnels.rpcAddressFor(stage.id, plan.id),
          // Patch 0003: llama-server speaks TLS to the workers' data ports itself, with no Node relay on this end.
          directRpcFor: binaries.rpcTlsPsk ? (stage, plan) => tunnels.directRpcFor(stage.id, plan.id) : undefined,
          threads: tuning.threads,
          // The plan sized the KV cache for --ctx-size per slot (src/machines/kv-cache.ts): -c is the whole cache.
          ...llamaServeArgs(tuning.serve ?? DEFAULT_SERVE),
          env: crashEnv,
          // In llama.cpp's router-child mode llama-server does not exit on SIGTERM while its stdin (the
          // watchdog pipe) stays open: it hangs in "cleaning up before exit" until SIGKILL. It holds no
          // state worth a graceful exit, so a short grace keeps every mesh change from costing 5 s.
          killGraceMs: LLAMA_KILL_GRACE_MS,
          logger: componentLogger(logger, 'llama-server'),
          onWeightsOverWire: (w) => (overWire = w.byStage),
          onProgress: (p) => (progress = p),
        }),
        waitLlamaHealthy: waitLlamaHealthyLogic,
        llamaServerBackoff: backoffLogic(componentLogger(logger, 'llama-server')),
      },
    }),
  });
}

/**
 * llama-server's flags for the serving settings: -c is the whole cache (ctx per slot x slots). With one slot
 * (the default) no -np: llama.cpp's automatic slots share the one cache of --ctx-size tokens, as before.
 */
export function llamaServeArgs(serve: ServeSettings): { ctxSize: number; parallel?: number; flashAttention: ServeSettings['flashAttn']; extraArgs: string[] } {
  return {
    ctxSize: serve.ctxSize * serve.parallel,
    ...(serve.parallel > 1 ? { parallel: serve.parallel } : {}),
    flashAttention: serve.flashAttn,
    extraArgs: serve.cacheType === 'f16' ? [] : ['-ctk', serve.cacheType, '-ctv', serve.cacheType],
  };
}

/** What a WebSocket error event says (an ErrorEvent's message or error, else its type), never "[object Object]". */
export function inspectorError(e: unknown): string {
  const ev = e as { message?: unknown; error?: { message?: unknown; code?: unknown }; type?: unknown } | null;
  const message = typeof ev?.message === 'string' && ev.message !== '' ? ev.message : typeof ev?.error?.message === 'string' ? ev.error.message : null;
  if (message !== null) return message;
  if (e instanceof Error) return e.message;
  return typeof ev?.type === 'string' ? `a WebSocket ${ev.type} event without details` : String(e);
}

/** `--inspect`: opens the connection to the Stately inspector or a WebSocket one; null without the flag. */
export function openInspector(target: CliOptions['inspect'], logger: Logger): NodeInspector | null {
  if (target === null) return null;
  const log = componentLogger(logger, 'node');
  // The first actors start before the socket is open: keep their events until it is (default: 200).
  const inspectorOptions = { sanitizeContext: sanitizeForInspector, sanitizeEvent: sanitizeForInspector as never, maxDeferredEvents: 10_000 };
  // Stately's socket retries forever and reports each failure: the first one is worth a warning, the rest not.
  let failures = 0;
  const onSkyError = (e: unknown) => {
    const err = inspectorError(e);
    if (failures++ === 0) {
      log.warn({ err }, `inspector connection failed: cannot reach stately.ai's inspector service (${err}), so there is no link; it keeps retrying. Offline, use a local inspector: run \`mesh-inference inspector\` and start with --inspect ws://127.0.0.1:8080 (docs/node.md)`);
    } else {
      log.debug({ err, failures }, 'inspector connection failed again');
    }
  };
  const inspector =
    target.kind === 'sky'
      ? createSkyInspector({ ...inspectorOptions, onerror: onSkyError })
      : createWebSocketInspector({ ...inspectorOptions, url: target.url });
  log.info(
    { target: target.kind === 'sky' ? 'stately.ai' : target.url },
    target.kind === 'sky' ? 'sending the live actors to the Stately inspector (online: its link prints once connected)' : `sending the live actors to the WebSocket inspector at ${target.url}`,
  );
  return { inspect: inspector.inspect, stop: () => inspector.stop() };
}
