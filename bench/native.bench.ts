// Benchmark of our llama.cpp patches on loopback, printed as markdown tables: model load with and without
// SET_TENSOR_GGUF (time, bytes to the rpc-servers), RPC commands and blocking round trips per generated
// token, and tokens/s solo vs through two rpc-servers (llama-bench). Runs alternate side by side in one go.
//
//   npx tsx bench/native.bench.ts [--layers 6 --embd 768 --ff 6912 --type f16] [--model FILE]
//                                 [--reps 2] [--tokens 32] [--threads 1] [--md FILE]
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { describeMachine } from './machine.ts';
import { readGgufHeader } from '../src/io/gguf/gguf-reader.ts';
import { generateLlamaGguf, type WeightType } from '../src/io/gguf/gguf-writer.ts';
import { buildBinDir, ensureLlamaBinaries, LlamaBinariesError, type LlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { diffRpcSnapshots, startRpcTrafficProxy, type RpcTrafficProxy, type RpcTrafficSnapshot } from '../src/io/llama/rpc-traffic.ts';
import { greedyCompletion } from '../test/helpers/llama.ts';
import { MESH_RPC_COMMANDS, startNativeLlamaServer, startNativeRpcServer, type NativeRpcServer } from '../test/native-support.ts';

const execFileP = promisify(execFile);

const USAGE = `usage: npx tsx bench/native.bench.ts [options]
  --model FILE   use this GGUF (default: generate one into .cache/bench/)
  --layers N --embd N --ff N --type f16|q8_0|f32   shape of the generated model (default 6 768 6912 f16: ~270 MiB)
  --reps N       load runs per mode, alternating (default 2)
  --tokens N     generated tokens for the per-token counts (default 32)
  --threads N    CPU threads of every process (default 1)
  --md FILE      also write the tables to FILE`;

function fail(msg: string): never {
  process.stderr.write(`native.bench: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

const { values: args } = (() => {
  try {
    return parseArgs({
      options: {
        model: { type: 'string' },
        layers: { type: 'string', default: '6' },
        embd: { type: 'string', default: '768' },
        ff: { type: 'string', default: '6912' },
        type: { type: 'string', default: 'f16' },
        reps: { type: 'string', default: '2' },
        tokens: { type: 'string', default: '32' },
        threads: { type: 'string', default: '1' },
        md: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    });
  } catch (e) {
    fail((e as Error).message);
  }
})();
if (args.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}
const int = (v: string, name: string): number => (/^\d+$/.test(v) && Number(v) > 0 ? Number(v) : fail(`--${name} must be a positive integer`));
const REPS = int(args.reps, 'reps');
const TOKENS = int(args.tokens, 'tokens');
const THREADS = int(args.threads, 'threads');
const PROMPT = 'Once upon a time, in a land far away,';

const out: string[] = [];
function print(line = ''): void {
  out.push(line);
  process.stdout.write(`${line}\n`);
}
function table(head: string[], rows: (string | number)[][]): void {
  const cells = rows.map((r) => r.map(String));
  print(`| ${head.join(' | ')} |`);
  print(`|${head.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`);
  for (const r of cells) print(`| ${r.join(' | ')} |`);
  print();
}
const mib = (n: number): string => (n / 1048576).toFixed(2);
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function modelPath(): Promise<string> {
  if (args.model) {
    if (!existsSync(args.model)) fail(`--model ${args.model} does not exist`);
    return args.model;
  }
  const type = args.type as WeightType;
  if (!['f16', 'f32', 'q8_0'].includes(type)) fail('--type must be f16, f32 or q8_0');
  const spec = { layers: int(args.layers, 'layers'), embd: int(args.embd, 'embd'), ff: int(args.ff, 'ff'), type, seed: 1 };
  const dir = join(process.cwd(), '.cache', 'bench');
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `bench-${spec.layers}x${spec.embd}-ff${spec.ff}-${type}.gguf`);
  if (!existsSync(path)) {
    process.stderr.write(`generating ${path} ...\n`);
    // the vocab of the source tree that native/build.sh unpacked (the same release we run)
    await generateLlamaGguf(path, { ...spec, vocabPath: join(buildBinDir('mesh'), '..', '..', 'src', 'models', 'ggml-vocab-llama-spm.gguf') });
  }
  return path;
}

interface LoadRun {
  readonly mode: 'bytes' | 'gguf';
  readonly loadMs: number;
  readonly load: RpcTrafficSnapshot[];
  /** Per generated token, per rpc-server (only measured on the first run of each mode). */
  readonly perToken?: RpcTrafficSnapshot[];
}

async function loadRun(bins: LlamaBinaries, model: string, mode: 'bytes' | 'gguf', measureTokens: boolean): Promise<LoadRun> {
  const servers: NativeRpcServer[] = [];
  const proxies: RpcTrafficProxy[] = [];
  try {
    for (let i = 0; i < 2; i++) {
      const s = await startNativeRpcServer(bins.rpcServer, ['--gguf', model], { threads: THREADS });
      servers.push(s);
      proxies.push(await startRpcTrafficProxy({ target: s.address, extraCommands: MESH_RPC_COMMANDS }));
    }
    const llama = await startNativeLlamaServer(bins.llamaServer, {
      model,
      rpc: proxies.map((p) => p.address),
      threads: THREADS,
      extraArgs: ['--tensor-split', '1,1'],
      env: mode === 'bytes' ? { GGML_RPC_NO_GGUF: '1' } : {},
    });
    try {
      const load = proxies.map((p) => p.snapshot());
      let perToken: RpcTrafficSnapshot[] | undefined;
      if (measureTokens) {
        // prompt + 1 token, then prompt + 1 + TOKENS: the difference is what TOKENS more tokens cost. A first
        // request warms the client's caches (GET_ALLOC_SIZE answers per graph shape), as any earlier request would.
        await greedyCompletion(llama, PROMPT, 1 + TOKENS, { ignore_eos: true });
        const before = proxies.map((p) => p.snapshot());
        await greedyCompletion(llama, PROMPT, 1, { ignore_eos: true });
        const mid = proxies.map((p) => p.snapshot());
        await greedyCompletion(llama, PROMPT, 1 + TOKENS, { ignore_eos: true });
        const after = proxies.map((p) => p.snapshot());
        perToken = after.map((a, i) => {
          const long = diffRpcSnapshots(a, mid[i]!);
          const short = diffRpcSnapshots(mid[i]!, before[i]!);
          return diffRpcSnapshots(long, short);
        });
      }
      return { mode, loadMs: llama.loadMs, load, perToken };
    } finally {
      await llama.stop();
    }
  } finally {
    for (const p of proxies) await p.close();
    for (const s of servers) await s.stop();
  }
}

async function soloLoadMs(bins: LlamaBinaries, model: string): Promise<number> {
  const llama = await startNativeLlamaServer(bins.llamaServer, { model, threads: THREADS });
  await llama.stop();
  return llama.loadMs;
}

interface BenchRow {
  readonly test: string;
  readonly tps: number;
  readonly sd: number;
}

/** llama-bench: pp64 and tg64, -fa 0, -r 3, JSON out. */
async function llamaBench(bins: LlamaBinaries, model: string, rpc: string[] | null): Promise<BenchRow[]> {
  if (!bins.llamaBench) throw new LlamaBinariesError(`no llama-bench in ${bins.dir}: rebuild with native/build.sh (its default targets include it)`);
  const argv = ['-m', model, '-p', '64', '-n', '64', '-fa', '0', '-t', String(THREADS), '-r', '3', '-o', 'json', '-ngl', '99'];
  if (rpc) argv.push('--rpc', rpc.join(','), '-ts', '1/1');
  // stdout alone carries the JSON (the logs go to stderr); async, so the rpc-servers' output keeps draining
  let stdout: string;
  try {
    ({ stdout } = await execFileP(bins.llamaBench, argv, { env: { ...process.env, GGML_RPC_NO_RDMA: '1' }, maxBuffer: 64 << 20, timeout: 20 * 60_000 }));
  } catch (e) {
    const err = e as { code?: number; stderr?: string };
    throw new Error(`llama-bench failed (exit ${err.code}):\n${(err.stderr ?? '').split('\n').slice(-30).join('\n')}`);
  }
  const json = JSON.parse(stdout) as { n_prompt: number; n_gen: number; avg_ts: number; stddev_ts: number }[];
  return json.map((r) => ({ test: r.n_prompt > 0 ? `pp${r.n_prompt}` : `tg${r.n_gen}`, tps: r.avg_ts, sd: r.stddev_ts }));
}

async function main(): Promise<void> {
  let bins: LlamaBinaries;
  try {
    bins = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => process.stderr.write(`${l}\n`) });
  } catch (e) {
    if (e instanceof LlamaBinariesError) fail(e.message);
    throw e;
  }
  if (!bins.setTensorGguf) fail(`${bins.dir} lacks the set-tensor-gguf patch (found: ${bins.patches.join(', ') || 'none'})`);
  const model = await modelPath();
  const header = await readGgufHeader(model);
  const offloaded = header.tensors.filter((t) => t.name !== 'token_embd.weight').reduce((a, t) => a + t.bytes, 0);

  print(`## llama.cpp RPC on loopback (CPU build, ${THREADS} thread(s) per process)`);
  print();
  print(describeMachine());
  print();
  print(`model: ${model.split('/').pop()} — ${mib(header.fileBytes)} MiB, ${header.layerCount} layers, ${header.tensors.length} tensors; ` +
    `${mib(offloaded)} MiB of it on the two rpc-servers (split 1:1; token embeddings stay on the host). ` +
    `binaries: ${bins.dir} (${bins.build?.backend ?? 'unknown backend'}, patches: ${bins.patches.join(', ')})`);
  print();

  // Load: alternate the modes so that both see the same page cache and machine load.
  const runs: LoadRun[] = [];
  const solo: number[] = [];
  for (let r = 0; r < REPS; r++) {
    solo.push(await soloLoadMs(bins, model));
    for (const mode of ['bytes', 'gguf'] as const) {
      process.stderr.write(`load run ${r + 1}/${REPS}: ${mode}\n`);
      runs.push(await loadRun(bins, model, mode, r === 0));
    }
  }
  const sum = (xs: RpcTrafficSnapshot[], f: (s: RpcTrafficSnapshot) => number): number => xs.reduce((a, s) => a + f(s), 0);
  const of = (mode: 'bytes' | 'gguf') => runs.filter((x) => x.mode === mode);
  const loadRow = (label: string, mode: 'bytes' | 'gguf') => {
    const rs = of(mode);
    const ms = median(rs.map((x) => x.loadMs));
    const bytes = median(rs.map((x) => sum(x.load, (s) => s.totals.bytesToServer)));
    const rts = median(rs.map((x) => sum(x.load, (s) => s.totals.roundTrips)));
    const cmds = median(rs.map((x) => sum(x.load, (s) => s.totals.count)));
    const gguf = median(rs.map((x) => sum(x.load, (s) => s.commands.SET_TENSOR_GGUF?.count ?? 0)));
    return { label, ms, bytes, rts, cmds, gguf };
  };
  const bytesRow = loadRow('weights sent as bytes (`GGML_RPC_NO_GGUF=1`)', 'bytes');
  const ggufRow = loadRow('weights from each worker\'s GGUF (`--gguf`)', 'gguf');
  print(`### Model load through two rpc-servers (spawn to /health 200, median of ${REPS})`);
  print();
  table(
    ['mode', 'load s', 'MiB to rpc-servers', '% of model', 'RPC commands', 'blocking round trips', 'SET_TENSOR_GGUF'],
    [bytesRow, ggufRow].map((r) => [r.label, (r.ms / 1000).toFixed(2), mib(r.bytes), ((100 * r.bytes) / header.fileBytes).toFixed(2), r.cmds, r.rts, r.gguf]),
  );
  print(`solo llama-server (no rpc-servers) loads in ${(median(solo) / 1000).toFixed(2)} s. ` +
    `With the patch: ${(bytesRow.bytes / Math.max(1, ggufRow.bytes)).toFixed(0)}x fewer bytes, load time ratio gguf/bytes = ${(ggufRow.ms / bytesRow.ms).toFixed(2)}.`);
  print();

  // Per generated token, per rpc-server.
  const tok = runs.find((x) => x.mode === 'gguf' && x.perToken)!.perToken!;
  print(`### RPC traffic per generated token (${TOKENS} tokens, difference of two requests; the second server holds the output layer)`);
  print();
  const names = [...new Set(tok.flatMap((s) => Object.keys(s.commands)))].sort();
  const per = (s: RpcTrafficSnapshot, name: string, f: 'count' | 'roundTrips' | 'bytesToServer' | 'bytesToClient'): string =>
    ((s.commands[name]?.[f] ?? 0) / TOKENS).toFixed(2);
  table(
    ['command', 'server 1: count', 'round trips', 'bytes ->', 'bytes <-', 'server 2: count', 'round trips', 'bytes ->', 'bytes <-'],
    [
      ...names.map((n) => [n, ...tok.flatMap((s) => [per(s, n, 'count'), per(s, n, 'roundTrips'), per(s, n, 'bytesToServer'), per(s, n, 'bytesToClient')])]),
      ['TOTAL', ...tok.flatMap((s) => [(s.totals.count / TOKENS).toFixed(2), (s.totals.roundTrips / TOKENS).toFixed(2), (s.totals.bytesToServer / TOKENS).toFixed(0), (s.totals.bytesToClient / TOKENS).toFixed(0)])],
    ],
  );

  // Throughput: llama-bench straight to the rpc-servers (no proxy in the way).
  print(`### Tokens/s (llama-bench -p 64 -n 64 -fa 0 -r 3, ${THREADS} thread(s))`);
  print();
  const soloBench = await llamaBench(bins, model, null);
  const servers = [
    await startNativeRpcServer(bins.rpcServer, ['--gguf', model], { threads: THREADS }),
    await startNativeRpcServer(bins.rpcServer, ['--gguf', model], { threads: THREADS }),
  ];
  let rpcBench: BenchRow[];
  try {
    rpcBench = await llamaBench(bins, model, servers.map((s) => s.address));
  } finally {
    for (const s of servers) await s.stop();
  }
  table(
    ['test', 'solo tok/s', 'two rpc-servers tok/s', 'ratio'],
    soloBench.map((s, i) => {
      const r = rpcBench[i]!;
      return [s.test, `${s.tps.toFixed(1)} ± ${s.sd.toFixed(1)}`, `${r.tps.toFixed(1)} ± ${r.sd.toFixed(1)}`, (r.tps / s.tps).toFixed(2)];
    }),
  );
  if (args.md) writeFileSync(args.md, `${out.join('\n')}\n`);
}

main()
  .catch((e: unknown) => {
    process.stderr.write(`native.bench: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  })
  .finally(() => stopAll(2_000));
