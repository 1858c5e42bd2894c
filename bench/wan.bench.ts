// The mesh over emulated WAN links (issue 11): every node in a network namespace of its own, whose only route
// to the others is the link emulator's relays (test/support/wan-lab.ts, link-emulator.ts). For 2 and 3 nodes and
// each data path (direct TLS, QUIC) it measures, at RTT 0 / 5 / 20 / 40 ms and 20 ms with 1% loss:
//  - generation tokens/s (llama-server's own timings) next to the physical limit 1 / (t_compute + k x RTT):
//    t_compute = 1 / tok/s of the same mesh at 0 ms, k = network round trips per generated token, COUNTED by
//    the host's RPC traffic counter (MESH_INFERENCE_COUNT_RPC=1): round trips of a 2T-token generation minus
//    those of a T-token one, over T, summed over the workers (each is reached in turn);
//  - time to first token (a streamed request, prompt included);
//  - the added wait per RPC round trip (GET_TENSOR's wait at this RTT minus at 0 ms): the RTT the nodes see.
// Then, on a 3-node mesh with a spare (2-stage plan), per RTT: a worker SIGKILLed -> the host notices (its
// links drop the worker) -> serves again (first answer on a new plan).
// Prints markdown tables and writes the plot (bench/wan-plot.ts). Needs root (namespaces).
//
//   npx tsx bench/wan.bench.ts [--embd 2048 --layers 4 --ff 5632 --type q8_0] [--tokens 32] [--reps 3]
//                              [--rtts 0,5,20,40] [--plot docs/wan-rtt.png] [--no-death] [--quick]
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeMachine, machineInfo } from './machine.ts';
import { plotTokensVsRtt, type PlotPoint } from './wan-plot.ts';
import { cacheDir } from '../src/demo.ts';
import { generateLlamaGguf, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';
import { readModelIdentity } from '../src/io/gguf/gguf-identity.ts';
import { readModelShape } from '../src/io/gguf/gguf-shape.ts';
import { DEFAULT_SERVE, kvCacheBytes } from '../src/machines/kv-cache.ts';
import { diffRpcSnapshots, type RpcTrafficSnapshot } from '../src/io/llama/rpc-traffic.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { hostServing, stopAllNodes, type E2eModel, type E2eNode } from '../test/e2e-support.ts';
import { symmetricShape } from '../test/support/link-emulator.ts';
import { createWanLab, startWanNode, type WanLab } from '../test/support/wan-lab.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => (args.includes(f) ? args[args.indexOf(f) + 1] : undefined);
const QUICK = args.includes('--quick');
const intOpt = (f: string, dflt: number): number => {
  const n = Number(opt(f) ?? dflt);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${f} wants a positive integer`);
  return n;
};
const TYPE = opt('--type') ?? 'q8_0';
if (TYPE !== 'f16' && TYPE !== 'q8_0') throw new Error(`--type wants f16 or q8_0, not '${TYPE}'`);
const MODEL: LlamaModelSpec = { layers: intOpt('--layers', 4), embd: intOpt('--embd', 2048), ff: intOpt('--ff', 5632), type: TYPE, seed: 5 };
const TOKENS = intOpt('--tokens', QUICK ? 16 : 32);
const REPS = intOpt('--reps', QUICK ? 1 : 3);
const RTTS = (opt('--rtts') ?? '0,5,20,40').split(',').map(Number);
const PLOT = opt('--plot') ?? 'docs/wan-rtt.png';
const LOSS_RTT = 20;
const LOSS = 0.01;
const PROMPT = 'The mesh of ordinary machines serves one model, and the tokens';
const nodeEnv = { MESH_INFERENCE_COUNT_RPC: '1', MESH_INFERENCE_THREADS: '1', MESH_INFERENCE_CTX: '2048' };

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const say = (s = '') => process.stdout.write(`${s}\n`);
const log = (s: string) => process.stderr.write(`[wan] ${s}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function benchModel(): Promise<E2eModel> {
  const dir = cacheDir();
  await mkdir(dir, { recursive: true });
  const s = MODEL;
  const path = join(dir, `bench-${s.layers}x${s.embd}-ff${s.ff}-${s.type}-seed${s.seed}.gguf`);
  if (!existsSync(path)) {
    log(`generating ${path} ...`);
    await generateLlamaGguf(path, s);
  }
  const { bytes } = await readModelIdentity(path);
  // A plan needs 1.1 x the model + the host's KV cache (at the nodes' $MESH_INFERENCE_CTX): shares are of both.
  const kvBytes = kvCacheBytes(await readModelShape(path), { ...DEFAULT_SERVE, ctxSize: 2048 });
  const tmp = await mkdtemp(join(tmpdir(), 'mesh-wan-'));
  return { path, bytes, dir: tmp, kvBytes, vram: (share) => String(Math.floor((bytes + kvBytes) * share)), remove: () => rm(tmp, { recursive: true, force: true }) };
}

interface Generation {
  readonly tokensPerSecond: number;
  readonly predicted: number;
}

async function generate(api: string, tokens = TOKENS): Promise<Generation> {
  const res = await fetch(`${api}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, max_tokens: tokens, temperature: 0, top_k: 1, seed: 1, cache_prompt: false, ignore_eos: true }),
    signal: AbortSignal.timeout(600_000),
  });
  const body = (await res.json()) as { timings?: { predicted_per_second?: number; predicted_n?: number } };
  if (!res.ok || body.timings?.predicted_per_second === undefined) throw new Error(`${api}: ${res.status} ${JSON.stringify(body).slice(0, 300)}`);
  return { tokensPerSecond: body.timings.predicted_per_second, predicted: body.timings.predicted_n ?? tokens };
}

/** Milliseconds from sending a streamed request to its first token (prompt processing included). */
async function timeToFirstToken(api: string): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`${api}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, max_tokens: 4, temperature: 0, cache_prompt: false, stream: true }),
    signal: AbortSignal.timeout(300_000),
  });
  const reader = res.body!.getReader();
  let text = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error('stream ended before a token');
    text += new TextDecoder().decode(value);
    if (/"text":"[^"]/.test(text)) break;
  }
  const ms = performance.now() - t0;
  await reader.cancel().catch(() => {});
  return ms;
}

async function traffic(host: E2eNode): Promise<Record<string, RpcTrafficSnapshot>> {
  return (await host.status()).rpcTraffic;
}

/** Over every worker: blocking round trips and GET_TENSOR's total wait between two readings. */
function roundTripsBetween(after: Record<string, RpcTrafficSnapshot>, before: Record<string, RpcTrafficSnapshot>) {
  let roundTrips = 0;
  let getTensorTrips = 0;
  let getTensorWaitMs = 0;
  for (const [id, a] of Object.entries(after)) {
    const d = before[id] ? diffRpcSnapshots(a, before[id]) : a;
    roundTrips += d.totals.roundTrips;
    getTensorTrips += d.commands['GET_TENSOR']?.roundTrips ?? 0;
    getTensorWaitMs += d.commands['GET_TENSOR']?.waitMs ?? 0;
  }
  return { roundTrips, getTensorTrips, getTensorWaitMs };
}

interface Cell {
  readonly rttMs: number;
  readonly loss: number;
  readonly tps: number;
  readonly tpsMin: number;
  readonly tpsMax: number;
  readonly ttftMs: number;
  /** GET_TENSOR's wait per round trip (worker compute + the network). */
  readonly waitPerTripMs: number;
}

interface Series {
  readonly name: string;
  readonly nodes: number;
  readonly path: 'auto' | 'quic';
  readonly split: string;
  /** Network round trips per generated token (counted). */
  readonly k: number;
  readonly cells: Cell[];
}

/** Starts `vrams.length` nodes in the lab's first sites (the first one's token for the others); waits for a plan of `stages` stages served. */
async function startMesh(lab: WanLab, model: E2eModel, vrams: readonly number[], path: 'auto' | 'quic', stages: number, names: string[] = []) {
  const nodes: E2eNode[] = [];
  const extraArgs = ['--data-path', path];
  const start = (i: number, join?: string) =>
    startWanNode(lab.sites[i]!, { name: names[i] ?? `n${i + 1}`, model, vram: vrams[i]!, join, dir: model.dir, env: nodeEnv, extraArgs });
  nodes.push(await start(0));
  for (let i = 1; i < vrams.length; i++) nodes.push(await start(i, nodes[0]!.token));
  const s = await nodes[0]!.waitStatus((x) => x.node.state === 'serving' && x.plan?.kind === 'ready' && x.plan.stages.length === stages, 600_000, `a ${stages}-stage plan`);
  if (s.plan?.kind !== 'ready') throw new Error('no plan');
  const hostId = s.plan.host;
  const host = nodes.find((n) => n.id === hostId)!;
  await host.waitStatus(hostServing, 600_000, 'the host serving');
  return { nodes, host, split: s.plan.stages.map((x) => x.share.toFixed(2)).join(' / ') };
}

async function measureSeries(lab: WanLab, model: E2eModel, vrams: readonly number[], path: 'auto' | 'quic'): Promise<Series> {
  const name = `${vrams.length} nodes, ${path === 'auto' ? 'direct TLS' : 'QUIC'}`;
  log(`${name}: starting`);
  lab.setShape(symmetricShape(0));
  const { nodes, host, split } = await startMesh(lab, model, vrams, path, vrams.length);
  try {
    // k: round trips of a 2T-token generation minus a T-token one, per token (prompt and set-up cancel out).
    await generate(host.api);
    const t0 = await traffic(host);
    const short = await generate(host.api, TOKENS);
    const t1 = await traffic(host);
    const long = await generate(host.api, 2 * TOKENS);
    const t2 = await traffic(host);
    const k = (roundTripsBetween(t2, t1).roundTrips - roundTripsBetween(t1, t0).roundTrips) / (long.predicted - short.predicted);
    log(`${name}: split ${split}; k = ${k.toFixed(2)} round trips per token`);
    const cells: Cell[] = [];
    const shapes = [...RTTS.map((r) => ({ rtt: r, loss: 0 })), { rtt: LOSS_RTT, loss: LOSS }];
    for (const { rtt, loss } of shapes) {
      lab.setShape(symmetricShape(rtt, { loss }));
      await generate(host.api, 4); // the new shape on every connection before measuring
      const before = await traffic(host);
      const runs: Generation[] = [];
      for (let i = 0; i < REPS; i++) runs.push(await generate(host.api));
      const trips = roundTripsBetween(await traffic(host), before);
      const ttfts: number[] = [];
      for (let i = 0; i < (QUICK ? 1 : 3); i++) ttfts.push(await timeToFirstToken(host.api));
      const ttft = median(ttfts);
      const tps = runs.map((r) => r.tokensPerSecond);
      const cell = { rttMs: rtt, loss, tps: median(tps), tpsMin: Math.min(...tps), tpsMax: Math.max(...tps), ttftMs: ttft, waitPerTripMs: trips.getTensorWaitMs / Math.max(1, trips.getTensorTrips) };
      cells.push(cell);
      log(`${name}: RTT ${rtt} ms${loss ? `, ${loss * 100}% loss` : ''}: ${cell.tps.toFixed(2)} tok/s, TTFT ${ttft.toFixed(0)} ms, ${cell.waitPerTripMs.toFixed(1)} ms per GET_TENSOR`);
    }
    const relays = lab.counters().slice(0, vrams.length);
    const via = path === 'auto' ? relays.map((c) => c.data.forward.deliveredBytes) : relays.map((c) => c.quic.forward.deliveredBytes);
    log(`${name}: bytes through each site's ${path === 'auto' ? 'TCP' : 'UDP'} relay towards the node: ${via.join(', ')}`);
    return { name, nodes: vrams.length, path, split, k, cells };
  } finally {
    await stopAllNodes(nodes);
  }
}

interface DeathRow {
  readonly rttMs: number;
  readonly noticedMs: number;
  readonly servingMs: number;
}

/** A 2-stage plan with a spare: per RTT, the worker is SIGKILLed; the host notices, re-plans with the spare and answers again. */
async function measureDeaths(lab: WanLab, model: E2eModel): Promise<DeathRow[]> {
  const names = ['d1', 'd2', 'd3'];
  const vrams = [0.7, 0.65, 0.6];
  lab.setShape(symmetricShape(0));
  const { nodes, host } = await startMesh(lab, model, vrams, 'auto', 2, names);
  const rows: DeathRow[] = [];
  try {
    for (const rtt of RTTS) {
      lab.setShape(symmetricShape(rtt));
      const s = await host.waitStatus((x) => hostServing(x) && x.plan?.kind === 'ready' && x.plan.stages.length === 2 && x.links.length === 2, 600_000, 'a 2-stage plan and both peers linked');
      await generate(host.api, 4);
      if (s.plan?.kind !== 'ready') throw new Error('no plan');
      const workerId = s.plan.stages.find((x) => x.id !== host.id)!.id;
      const i = nodes.findIndex((n) => n.id === workerId);
      log(`death at RTT ${rtt} ms: SIGKILL ${nodes[i]!.name}`);
      const t0 = performance.now();
      nodes[i]!.kill();
      await host.waitStatus((x) => !x.links.includes(workerId), 120_000, 'the worker noticed gone');
      const noticedMs = performance.now() - t0;
      await host.waitStatus((x) => hostServing(x) && x.plan?.kind === 'ready' && !x.plan.stages.some((st) => st.id === workerId), 600_000, 'a plan without the worker');
      await generate(host.api, 4);
      rows.push({ rttMs: rtt, noticedMs, servingMs: performance.now() - t0 });
      log(`death at RTT ${rtt} ms: noticed ${noticedMs.toFixed(0)} ms, serving again ${(rows.at(-1)!.servingMs / 1000).toFixed(1)} s`);
      while (nodes[i]!.proc.exitInfo() === null) await sleep(50);
      // The same node (same key file, same site) back for the next round: the plan moves back to it (more VRAM).
      nodes[i] = await startWanNode(lab.sites[i]!, { name: names[i]!, model, vram: vrams[i]!, join: host.token, dir: model.dir, env: nodeEnv });
      await host.waitStatus((x) => hostServing(x) && x.plan?.kind === 'ready' && x.plan.stages.some((st) => st.id === workerId), 600_000, 'the plan back to the restarted worker');
    }
  } finally {
    await stopAllNodes(nodes);
  }
  return rows;
}

async function main(): Promise<void> {
  const machine = machineInfo();
  const model = await benchModel();
  log(`model ${model.path} (${(model.bytes / 2 ** 20).toFixed(0)} MiB)`);
  const lab = await createWanLab(3);
  const series: Series[] = [];
  let deaths: DeathRow[] = [];
  try {
    for (const vrams of [[0.6, 0.7], [0.45, 0.4, 0.35]]) {
      for (const path of ['auto', 'quic'] as const) series.push(await measureSeries(lab, model, vrams, path));
    }
    if (!args.includes('--no-death')) deaths = await measureDeaths(lab, model);
  } finally {
    await stopAll(2_000);
    await lab.close();
    await model.remove();
  }
  report(machine, model, series, deaths);
  const points: PlotPoint[] = series.flatMap((s) => {
    const tCompute = 1 / s.cells[0]!.tps;
    return s.cells.filter((c) => c.loss === 0).map((c) => ({ series: s.name, rttMs: c.rttMs, measured: c.tps, limit: 1 / (tCompute + (s.k * c.rttMs) / 1000) }));
  });
  await plotTokensVsRtt(points, PLOT, `tokens/s against RTT: ${MODEL.layers} x ${MODEL.embd} ${MODEL.type}, ${TOKENS} tokens, 2 cores`);
  log(`plot written to ${PLOT}`);
}

function report(machine: ReturnType<typeof machineInfo>, model: E2eModel, series: Series[], deaths: DeathRow[]): void {
  say(`Model: ${MODEL.layers} layers, n_embd ${MODEL.embd}, ff ${MODEL.ff}, ${MODEL.type} (${(model.bytes / 2 ** 20).toFixed(0)} MiB); ` +
    `${TOKENS} generated tokens, median of ${REPS} runs per cell; -t 1 everywhere; every node in its own namespace, every pair across one relay.`);
  say(`${describeMachine(machine)} at the start; load ${loadavg().map((x) => x.toFixed(2)).join(' ')} at the end.`);
  say();
  say('| layout, data path | split | k (counted) | RTT ms | loss | tok/s median (min-max) | limit tok/s | measured / limit | TTFT ms | GET_TENSOR wait per trip ms | added per trip vs 0 ms |');
  say('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const s of series) {
    const base = s.cells[0]!;
    const tCompute = 1 / base.tps;
    for (const c of s.cells) {
      const limit = 1 / (tCompute + (s.k * c.rttMs) / 1000);
      say(`| ${s.name} | ${s.split} | ${s.k.toFixed(2)} | ${c.rttMs} | ${c.loss ? `${c.loss * 100}%` : '-'} | ${c.tps.toFixed(2)} (${c.tpsMin.toFixed(2)}-${c.tpsMax.toFixed(2)}) | ` +
        `${limit.toFixed(2)} | ${(c.tps / limit).toFixed(2)} | ${c.ttftMs.toFixed(0)} | ${c.waitPerTripMs.toFixed(1)} | ${(c.waitPerTripMs - base.waitPerTripMs).toFixed(1)} |`);
    }
  }
  say();
  if (deaths.length === 0) return;
  say('| RTT ms | worker SIGKILLed -> host drops the link, ms | -> first answer on the new plan, s |');
  say('|---|---|---|');
  for (const d of deaths) say(`| ${d.rttMs} | ${d.noticedMs.toFixed(0)} | ${(d.servingMs / 1000).toFixed(1)} |`);
}

await main();
process.exit(0);
