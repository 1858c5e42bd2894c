// Measures what the node's API proxy (src/io/http/api-server.ts) adds on top of llama-server, side by side in one
// run against the same llama-server: request latency of short non-streaming completions, time to the first
// streamed chunk, and streamed tokens/s. Prints markdown tables.
//
//   npx tsx bench/api-proxy.bench.ts [--n 50] [--model PATH]
//
// The model is the tiny generated one unless --model is given; llama-server runs through one local
// rpc-server, as on a solo host.
import { buildApiServer } from '../src/io/http/api-server.ts';
import { startLlamaServer } from '../src/io/llama/llama-server-process.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { startRpcServer } from '../src/io/llama/rpc-server-process.ts';
import { llamaBinaries, makeTempModel } from '../test/helpers/llama.ts';
import { describeMachine } from './machine.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};
const N = Number(opt('--n') ?? 50);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}
const ms = (x: number) => x.toFixed(2);
/** llama-server's per-start key: the direct target needs it (the proxy sends it itself and ignores ours). */
let auth: Record<string, string> = {};

async function completion(base: string, body: object): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...auth }, body: JSON.stringify(body) });
  await res.json();
  if (!res.ok) throw new Error(`${base}: ${res.status}`);
  return performance.now() - t0;
}

async function stream(base: string, body: object): Promise<{ firstMs: number; totalMs: number; chunks: number }> {
  const t0 = performance.now();
  const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...auth }, body: JSON.stringify({ ...body, stream: true }) });
  const reader = res.body!.getReader();
  let first = 0;
  let chunks = 0;
  const dec = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (first === 0) first = performance.now() - t0;
    chunks += (dec.decode(value).match(/^data: \{/gm) ?? []).length;
  }
  return { firstMs: first, totalMs: performance.now() - t0, chunks };
}

async function main(): Promise<void> {
  const bins = llamaBinaries();
  const model = opt('--model') ? { path: opt('--model')!, remove: async () => undefined } : await makeTempModel();
  try {
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    const llama = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [rpc.address], threads: 1, ctxSize: 2048 });
    auth = { ...llama.authHeaders };
    const app = buildApiServer({ upstream: async () => ({ kind: 'url', baseUrl: llama.url, headers: llama.authHeaders }), status: () => ({}) });
    await app.listen({ host: '127.0.0.1', port: 0 });
    const proxy = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    const targets = [
      ['direct llama-server', llama.url],
      ['through the API proxy', proxy],
    ] as const;

    const short = { prompt: 'Hello', max_tokens: 1, temperature: 0 };
    // Warm both paths (connections, caches), then alternate so that drift hits both alike.
    for (const [, base] of targets) for (let i = 0; i < 5; i++) await completion(base, short);
    const lat: Record<string, number[]> = {};
    for (let i = 0; i < N; i++) for (const [name, base] of targets) (lat[name] ??= []).push(await completion(base, short));

    const long = { prompt: 'Once upon a time', max_tokens: 128, temperature: 0 };
    const st: Record<string, { firstMs: number; totalMs: number; chunks: number }[]> = {};
    for (let i = 0; i < Math.max(3, Math.floor(N / 10)); i++) for (const [name, base] of targets) (st[name] ??= []).push(await stream(base, long));

    console.log(`\n${describeMachine()}`);
    console.log(`\n### API proxy overhead (${N} requests each, 1-token completions)\n`);
    console.log('| path | p50 ms | p99 ms | mean ms |');
    console.log('|---|---|---|---|');
    for (const [name] of targets) {
      const xs = lat[name]!;
      console.log(`| ${name} | ${ms(pct(xs, 50))} | ${ms(pct(xs, 99))} | ${ms(xs.reduce((a, b) => a + b, 0) / xs.length)} |`);
    }
    const d50 = pct(lat[targets[1][0]]!, 50) - pct(lat[targets[0][0]]!, 50);
    console.log(`\nadded by the proxy at p50: ${ms(d50)} ms per request`);

    console.log(`\n### Streaming (128 tokens)\n`);
    console.log('| path | first chunk p50 ms | chunks/s p50 |');
    console.log('|---|---|---|');
    for (const [name] of targets) {
      const xs = st[name]!;
      console.log(`| ${name} | ${ms(pct(xs.map((x) => x.firstMs), 50))} | ${pct(xs.map((x) => (x.chunks / x.totalMs) * 1000), 50).toFixed(1)} |`);
    }
    await app.close();
  } finally {
    await stopAll(3000);
    await model.remove();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
