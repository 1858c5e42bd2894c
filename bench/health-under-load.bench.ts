// Does llama-server answer GET /health during a long prefill on a loaded CPU? The liveness bound
// (src/io/llama/liveness.ts: a probe every 2 s, 2 s each, 3 misses in a row) must never fire then.
// `npx tsx bench/health-under-load.bench.ts [--burners 2] [--tokens 1500]`: one llama-server on a generated
// model (4 layers, n_embd 1024, f16) using every core, plus `--burners` busy-looping processes, one long prompt
// (prefill only, 1 generated token); /health asked every 250 ms throughout. Prints the answer times.
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateLlamaGguf } from '../src/io/gguf/gguf-writer.ts';
import { startLlamaServer } from '../test/helpers/llama.ts';

const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const burnersN = arg('burners', 2);
const nTokens = arg('tokens', 1500);
const dir = await mkdtemp(join(tmpdir(), 'health-load-'));
const model = join(dir, 'm.gguf');
await generateLlamaGguf(model, { layers: 4, embd: 1024, ff: 2816, type: 'f16', seed: 3 });
const threads = cpus().length;
const server = await startLlamaServer({ model, threads, ctx: 4096, readyTimeoutMs: 120_000 });
const burners = Array.from({ length: burnersN }, () => spawn(process.execPath, ['-e', 'for(;;){}'], { stdio: 'ignore' }));
const times: number[] = [];
let slowest = 0;
let busy = true;
const prober = (async () => {
  while (busy) {
    const t = performance.now();
    try {
      const res = await fetch(`${server.url}/health`, { signal: AbortSignal.timeout(30_000) });
      await res.arrayBuffer();
    } catch {
      times.push(Infinity);
    }
    const ms = performance.now() - t;
    times.push(ms);
    slowest = Math.max(slowest, ms);
    await new Promise((r) => setTimeout(r, 250));
  }
})();
const words = 'the mesh keeps every request alive while a node computes its long prompt'.split(' ');
const prompt = Array.from({ length: nTokens }, (_, i) => words[i % words.length]).join(' ');
const t0 = performance.now();
const res = await fetch(`${server.url}/completion`, {
  method: 'POST',
  headers: { ...server.authHeaders, 'content-type': 'application/json' },
  body: JSON.stringify({ prompt, n_predict: 1, cache_prompt: false }),
});
const body = (await res.json()) as { timings?: { prompt_n?: number; prompt_ms?: number } };
const prefillMs = performance.now() - t0;
busy = false;
await prober;
for (const b of burners) b.kill('SIGKILL');
await server.stop();
await rm(dir, { recursive: true, force: true });
const sorted = [...times].sort((a, b) => a - b);
const q = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!.toFixed(1);
console.log(`cores ${threads} (llama-server -t ${threads}), ${burnersN} busy-loop burners, load ${loadavg().map((l) => l.toFixed(1)).join(' ')}`);
console.log(`prefill: ${body.timings?.prompt_n} tokens in ${(prefillMs / 1000).toFixed(1)} s (llama-server says ${((body.timings?.prompt_ms ?? 0) / 1000).toFixed(1)} s)`);
console.log(`/health during it: ${times.length} probes, p50 ${q(0.5)} ms, p99 ${q(0.99)} ms, max ${slowest.toFixed(1)} ms, over 2 s: ${times.filter((t) => t > 2_000).length}`);
