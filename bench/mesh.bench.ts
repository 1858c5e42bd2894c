// The whole mesh against plain llama.cpp, in one run on this machine, every node a real `mesh-inference`
// process on loopback. Prints markdown tables:
//  1. generation tokens/s: solo, 2-node and 3-node meshes, each data path (`--paths auto,quic`: the direct TLS
//     path, then QUIC only), each next to direct llama.cpp RPC over raw TCP with the same split and layout
//     (same llama-server flags, rpc-servers reached directly instead of through the mesh), the ratio and
//     the milliseconds the mesh adds per remote stage per generated token;
//  2. time from a mesh change to serving again (a joining node that changes the plan; a worker SIGKILLed);
//  3. what the node's API adds per request: llama-server directly, the host's API, a worker's API (over the
//     mesh's http tunnel).
//
//   npx tsx bench/mesh.bench.ts [--model PATH | --embd 512 --layers 8 --ff 2048 --type f16|q8_0] [--reps 3] [--tokens 64]
//                               [--paths auto,quic] [--tokens-only] [--quick]
//
// The model is generated (random weights, cached under the user's cache dir) unless --model is given; --embd,
// --layers, --ff and --type set its shape (default 8 layers of width 512, ff 2048, f16). On the GPU machine:
// bench/device/README.md.
// Threads: every rpc-server and llama-server gets -t 1 (MESH_INFERENCE_THREADS), direct baselines too.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeMachine, machineInfo } from './machine.ts';
import { cacheDir } from '../src/demo.ts';
import { generateLlamaGguf, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';
import { readModelIdentity } from '../src/io/gguf/gguf-identity.ts';
import { readModelShape } from '../src/io/gguf/gguf-shape.ts';
import { DEFAULT_SERVE, kvCacheBytes } from '../src/machines/kv-cache.ts';
import { findLlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { launchLlamaServer, type LlamaServerProcess } from '../src/io/llama/llama-server-process.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { startRpcServer, type RpcServerProcess } from '../src/io/llama/rpc-server-process.ts';
import { e2eBinDir, hostServing, servesPlan, startE2eNode, stopAllNodes, type E2eModel, type E2eNode } from '../test/e2e-support.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};
const QUICK = args.includes('--quick');
/** Skip the plan-change and API-latency parts (the GPU run wants tokens/s only). */
const TOKENS_ONLY = args.includes('--tokens-only');
/** The mesh's data paths to measure, each against the same direct baseline: auto (direct TLS) and quic. */
const PATHS = (opt('--paths') ?? 'auto,quic').split(',') as ('auto' | 'quic')[];
const REPS = Number(opt('--reps') ?? (QUICK ? 2 : 5));
const TOKENS = Number(opt('--tokens') ?? 64);
const LATENCY_N = QUICK ? 20 : 50;
const THREADS = 1;
const PROMPT = 'The mesh of ordinary machines serves one model, and the tokens';

const intOpt = (f: string, dflt: number): number => {
  const v = opt(f);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${f} wants a positive integer, not '${v}'`);
  return n;
};
const TYPE = opt('--type') ?? 'f16';
if (TYPE !== 'f16' && TYPE !== 'q8_0') throw new Error(`--type wants f16 or q8_0, not '${TYPE}'`);
/** Default 8 layers of width 512 (~130 MB, F16): big enough that compute, not overhead, sets the pace. */
const BENCH_MODEL: LlamaModelSpec = { layers: intOpt('--layers', 8), embd: intOpt('--embd', 512), ff: intOpt('--ff', 2048), type: TYPE, seed: 5 };

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;
const say = (s = '') => process.stdout.write(`${s}\n`);
const log = (s: string) => process.stderr.write(`[bench] ${s}\n`);

async function benchModel(): Promise<E2eModel> {
  const given = opt('--model');
  let path: string;
  if (given) path = given;
  else {
    const s = BENCH_MODEL;
    const dir = cacheDir();
    await mkdir(dir, { recursive: true });
    path = join(dir, `bench-${s.layers}x${s.embd}-ff${s.ff}-${s.type}-seed${s.seed}.gguf`);
    if (!existsSync(path)) {
      log(`generating ${path} ...`);
      await generateLlamaGguf(path, s);
    }
  }
  const { bytes } = await readModelIdentity(path);
  // A plan needs 1.1 x the model + the host's KV cache (at the nodes' $MESH_INFERENCE_CTX): shares are of both.
  const kvBytes = kvCacheBytes(await readModelShape(path), { ...DEFAULT_SERVE, ctxSize: 4096 });
  const dir = await mkdtemp(join(tmpdir(), 'mesh-bench-'));
  return { path, bytes, dir, kvBytes, vram: (share) => String(Math.floor((bytes + kvBytes) * share)), remove: () => rm(dir, { recursive: true, force: true }) };
}

interface Timings {
  readonly predictedPerSecond: number;
  readonly promptPerSecond: number;
}

/** One greedy completion of TOKENS tokens; llama-server's own timings. */
async function generate(baseUrl: string): Promise<Timings> {
  const res = await fetch(`${baseUrl}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, max_tokens: TOKENS, temperature: 0, top_k: 1, seed: 1, cache_prompt: false, ignore_eos: true }),
    signal: AbortSignal.timeout(300_000),
  });
  const body = (await res.json()) as { timings?: { predicted_per_second?: number; prompt_per_second?: number } };
  if (!res.ok || body.timings?.predicted_per_second === undefined) throw new Error(`${baseUrl}: ${res.status} ${JSON.stringify(body).slice(0, 300)}`);
  return { predictedPerSecond: body.timings.predicted_per_second, promptPerSecond: body.timings.prompt_per_second ?? NaN };
}

/** Plain llama.cpp: rpc-servers reached over raw TCP, the last one the host's; the mesh's llama-server flags. */
async function startDirect(model: E2eModel, shares: readonly number[]): Promise<{ url: string; stop(): Promise<void> }> {
  const bins = await findLlamaBinaries({ env: { ...process.env, MESH_LLAMA_BIN_DIR: e2eBinDir() } });
  const servers: RpcServerProcess[] = [];
  let llama: LlamaServerProcess | null = null;
  const stop = async () => {
    await llama?.stop(1_000);
    await Promise.all(servers.map((s) => s.stop(2_000)));
  };
  try {
    for (const _ of shares) {
      servers.push(await startRpcServer({ binary: bins.rpcServer, gguf: model.path, ggufSupported: bins.setTensorGguf, threads: THREADS, env: { GGML_NO_BACKTRACE: '1' } }));
    }
    llama = await launchLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: servers.map((s) => s.address), tensorSplit: shares, threads: THREADS, env: { GGML_NO_BACKTRACE: '1' } });
    await llama.waitHealthy({ timeoutMs: 300_000 });
    return { url: llama.url, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

interface Side {
  readonly tg: number;
  readonly tgMin: number;
  readonly tgMax: number;
  readonly pp: number;
}
interface Comparison {
  readonly mesh: Side;
  readonly direct: Side;
  /** Median of the ratios of neighbouring runs (mesh run i / direct run i). */
  readonly ratio: number;
}

/**
 * Mesh and direct, alternating run by run (this machine is shared, and its load drifts: alternating keeps
 * the drift out of the ratio, which is taken pair by pair).
 */
async function compare(meshUrl: string, directUrl: string): Promise<Comparison> {
  await generate(meshUrl);
  await generate(directUrl);
  const m: Timings[] = [];
  const d: Timings[] = [];
  for (let i = 0; i < REPS; i++) {
    m.push(await generate(meshUrl));
    d.push(await generate(directUrl));
  }
  const side = (xs: Timings[]): Side => {
    const tg = xs.map((r) => r.predictedPerSecond);
    return { tg: median(tg), tgMin: Math.min(...tg), tgMax: Math.max(...tg), pp: median(xs.map((r) => r.promptPerSecond)) };
  };
  return { mesh: side(m), direct: side(d), ratio: median(m.map((x, i) => x.predictedPerSecond / d[i]!.predictedPerSecond)) };
}

const nodeEnv = { MESH_INFERENCE_COUNT_RPC: '0', MESH_INFERENCE_THREADS: String(THREADS), MESH_INFERENCE_CTX: '4096' };

async function mesh(model: E2eModel, vrams: readonly number[], dataPath: 'auto' | 'quic' = 'auto'): Promise<{ nodes: E2eNode[]; shares: number[] }> {
  const nodes: E2eNode[] = [];
  const extraArgs = ['--data-path', dataPath];
  const first = await startE2eNode({ name: 'n1', model, vram: vrams[0]!, dir: model.dir, env: nodeEnv, extraArgs });
  nodes.push(first);
  for (let i = 1; i < vrams.length; i++) {
    nodes.push(await startE2eNode({ name: `n${i + 1}`, model, vram: vrams[i]!, join: first.token, dir: model.dir, env: nodeEnv, extraArgs }));
  }
  const s = await first.waitStatus(
    (x) => x.node.state === 'serving' && x.plan?.kind === 'ready' && x.plan.stages.length === vrams.length,
    300_000,
    `a ${vrams.length}-stage plan`,
  );
  if (s.plan?.kind !== 'ready') throw new Error('no plan');
  const host = nodes.find((n) => n.id === (s.plan as { host: string }).host)!;
  await host.waitStatus(hostServing, 300_000, 'the host serving');
  return { nodes, shares: s.plan.stages.map((x) => x.share) };
}

async function hostOf(nodes: readonly E2eNode[]): Promise<E2eNode> {
  const s = await nodes[0]!.status();
  if (s.plan?.kind !== 'ready') throw new Error('no plan');
  const host = s.plan.host;
  return nodes.find((n) => n.id === host)!;
}

/** GET /v1/models against each URL in turn, request by request (the load drifts alike for all). */
async function latencies(urls: readonly string[]): Promise<number[][]> {
  const times: number[][] = urls.map(() => []);
  for (let i = 0; i < LATENCY_N + 3; i++) {
    for (const [k, url] of urls.entries()) {
      const t0 = performance.now();
      const res = await fetch(`${url}/v1/models`);
      await res.arrayBuffer();
      if (i >= 3) times[k]!.push(performance.now() - t0);
    }
  }
  return times;
}

async function main(): Promise<void> {
  const machine = machineInfo();
  const model = await benchModel();
  const bins = await findLlamaBinaries({ env: { ...process.env, MESH_LLAMA_BIN_DIR: e2eBinDir() } });
  log(`model ${model.path} (${(model.bytes / 2 ** 20).toFixed(0)} MiB); binaries ${bins.dir} (${bins.patches.join(', ') || 'stock'})`);
  const rows: string[] = [];
  const changes: string[] = [];
  const lat: string[] = [];
  try {
    // ---- solo -------------------------------------------------------------------------------------
    log('solo: mesh and direct (one rpc-server)');
    {
      const { nodes } = await mesh(model, [2]);
      const d = await startDirect(model, [1]);
      const r = await compare((await hostOf(nodes)).api, d.url);
      rows.push(row("solo (the host's own rpc-server)", '1', r));
      await d.stop();
      await stopAllNodes(nodes);
    }

    // ---- 2 and 3 nodes, per data path, each against direct RPC with the same split ----------------
    for (const vrams of [[0.7, 0.6], [0.45, 0.4, 0.35]]) {
      let direct: Awaited<ReturnType<typeof startDirect>> | null = null;
      for (const path of PATHS) {
        log(`mesh, ${vrams.length} nodes, --data-path ${path}`);
        const { nodes, shares } = await mesh(model, vrams, path);
        direct ??= await startDirect(model, shares);
        const r = await compare((await hostOf(nodes)).api, direct.url);
        rows.push(row(`${vrams.length}-node mesh, ${path === 'auto' ? 'direct TLS data path' : 'QUIC data path'}`, shares.map((x) => x.toFixed(2)).join(' / '), r, vrams.length - 1));
        await stopAllNodes(nodes);
      }
      await direct?.stop();
    }

    // ---- 2 nodes: API latency, plan change, worker death ------------------------------------------
    if (!TOKENS_ONLY) {
      log('mesh, 2 nodes: API latency and mesh changes');
      const { nodes } = await mesh(model, [0.7, 0.6]);
      const host = await hostOf(nodes);
      const worker = nodes.find((n) => n !== host)!;

      log('API latency');
      const llamaPort = (await host.status()).processes.llamaServer.port!;
      const [base, viaHost, viaWorker] = (await latencies([`http://127.0.0.1:${llamaPort}`, host.api, worker.api])) as [number[], number[], number[]];
      const p50 = median(base);
      lat.push(`| llama-server directly | ${p50.toFixed(2)} | ${pct(base, 99).toFixed(2)} | - |`);
      lat.push(`| the host's API (local route) | ${median(viaHost).toFixed(2)} | ${pct(viaHost, 99).toFixed(2)} | +${(median(viaHost) - p50).toFixed(2)} |`);
      lat.push(`| a worker's API (http tunnel, direct data path) | ${median(viaWorker).toFixed(2)} | ${pct(viaWorker, 99).toFixed(2)} | +${(median(viaWorker) - p50).toFixed(2)} |`);

      log('mesh change: a node with more VRAM than the worker joins');
      const gen = (await host.status()).processes.llamaServer.generation;
      const t0 = performance.now();
      const joiner = await startE2eNode({ name: 'n3', model, vram: 0.65, join: host.token, dir: model.dir, env: nodeEnv });
      nodes.push(joiner);
      await host.waitStatus((x) => hostServing(x) && servesPlan([joiner.id, host.id])(x) && x.processes.llamaServer.generation === gen + 1, 300_000, 'the new plan served');
      await generate(host.api);
      changes.push(`| a node joins that changes the plan (process start -> first answer) | ${((performance.now() - t0) / 1000).toFixed(1)} |`);

      log('mesh change: the worker SIGKILLed');
      const t1 = performance.now();
      joiner.kill();
      await host.waitStatus((x) => hostServing(x) && servesPlan([worker.id, host.id])(x), 300_000, 'the old worker back');
      await generate(host.api);
      changes.push(`| a worker SIGKILLed (kill -> first answer; includes ~5 s of heartbeat detection) | ${((performance.now() - t1) / 1000).toFixed(1)} |`);
      await stopAllNodes(nodes);
    }
  } finally {
    await stopAll(2_000);
    await model.remove();
  }

  const shape = opt('--model') ? opt('--model') : `${BENCH_MODEL.layers} layers, n_embd ${BENCH_MODEL.embd}, ff ${BENCH_MODEL.ff}, ${BENCH_MODEL.type}`;
  say(`Model: ${shape} (${(model.bytes / 2 ** 20).toFixed(0)} MiB), ` +
    `${TOKENS} generated tokens, median of ${REPS} alternating mesh/direct runs; -t ${THREADS} everywhere; binaries: ${bins.patches.join(', ') || 'stock'}`);
  say();
  say(`${describeMachine(machine)} at the start; load ${loadavg().map((x) => x.toFixed(2)).join(' ')} at the end.`);
  say();
  say('| setup | split (--rpc order, host last) | direct TCP tg tok/s, median (min-max) | mesh tg tok/s | mesh / direct (pairwise median) | added per remote stage per token, ms | direct pp tok/s | mesh pp tok/s | pp mesh / direct |');
  say('|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) say(r);
  say();
  if (TOKENS_ONLY) return;
  say('| mesh change | seconds to serving again |');
  say('|---|---|');
  for (const r of changes) say(r);
  say();
  say(`| GET /v1/models, ${LATENCY_N} requests | p50 ms | p99 ms | added p50 ms |`);
  say('|---|---|---|---|');
  for (const r of lat) say(r);
}

/** `remoteStages`: stages reached over the network (all but the host's own): the per-stage cost divides by it. */
function row(name: string, split: string, c: Comparison, remoteStages = 0): string {
  const tg = (x: Side) => `${x.tg.toFixed(1)} (${x.tgMin.toFixed(0)}-${x.tgMax.toFixed(0)})`;
  const perStage = remoteStages > 0 ? ((1000 / c.mesh.tg - 1000 / c.direct.tg) / remoteStages).toFixed(3) : '-';
  return `| ${name} | ${split} | ${tg(c.direct)} | ${tg(c.mesh)} | ${c.ratio.toFixed(2)} | ${perStage} | ${c.direct.pp.toFixed(0)} | ${c.mesh.pp.toFixed(0)} | ${(c.mesh.pp / c.direct.pp).toFixed(2)} |`;
}

await main();
process.exit(0);
