// Measures what the TCP -> iroh QUIC -> TCP tunnel costs, side by side with direct TCP in one run, and prints
// markdown tables: small-message round trips (p50/p99), throughput per stream, how fast a peer's end is
// seen without heartbeats, and llama.cpp tokens/s with one rpc-server behind the tunnel (host's own last).
//
//   npx tsx bench/tunnel.bench.ts [--quick] [--no-llama] [--no-death] [--model PATH]
//
// Every role runs in its own process, as in a real mesh: the client (this process), the host node's tunnel,
// the worker node's tunnel, and the TCP server behind it; so no two of them share an event loop.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/secret-key.ts';
import { TunnelService } from '../src/io/tunnel.ts';

const SELF = fileURLToPath(import.meta.url);
const args = process.argv.slice(2);
const flag = (f: string): boolean => args.includes(f);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};

// ---------------------------------------------------------------------------------------------------------
// Child roles

async function roleServer(): Promise<void> {
  // 'E': echo. 'U' + u64 n: swallow n bytes, answer 'k'. 'D' + u64 n: send n bytes.
  const server = createServer({ noDelay: true }, (s) => {
    s.setNoDelay(true);
    s.on('error', () => {});
    let mode: string | undefined;
    let header = Buffer.alloc(0);
    let left = 0;
    s.on('data', (b: Buffer) => {
      if (mode === undefined) {
        header = Buffer.concat([header, b]);
        if (header[0] === 0x45) {
          mode = 'E';
          const rest = header.subarray(1);
          if (rest.length) s.write(rest);
          return;
        }
        if (header.length < 9) return;
        mode = String.fromCharCode(header[0]!);
        left = Number(header.readBigUInt64LE(1));
        const rest = header.subarray(9);
        if (mode === 'D') {
          void sendN(s, left);
          return;
        }
        b = rest;
      }
      if (mode === 'E') s.write(b);
      else if (mode === 'U') {
        left -= b.length;
        if (left <= 0) s.write('k');
      }
    });
  });
  server.listen(0, '127.0.0.1', () => {
    const a = server.address();
    process.stdout.write(JSON.stringify({ port: typeof a === 'object' && a ? a.port : 0 }) + '\n');
  });
}

async function sendN(s: Socket, n: number): Promise<void> {
  const chunk = Buffer.alloc(64 * 1024, 7);
  while (n > 0) {
    const c = n >= chunk.length ? chunk : chunk.subarray(0, n);
    n -= c.length;
    if (!s.write(c)) await new Promise((r) => s.once('drain', r));
  }
}

async function roleWorker(targetPort: number): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
  const t = new TunnelService({ allow: () => ({ host: '127.0.0.1', port: targetPort }) }, { endpoint: ep });
  t.start();
  void (async () => {
    while ((await ep.accept()) !== null);
  })();
  process.stdout.write(JSON.stringify({ id: ep.id, addrs: ep.addrs() }) + '\n');
}

async function roleHost(workerId: string, workerAddrs: string[]): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
  const t = new TunnelService({ allow: () => ({ refuse: 'host' }) }, { endpoint: ep });
  t.start();
  await ep.dial(asEndpointId(workerId), workerAddrs);
  const l = await t.listen(asEndpointId(workerId), 'rpc');
  process.stdout.write(JSON.stringify({ port: l.port }) + '\n');
}

// ---------------------------------------------------------------------------------------------------------
// Harness

const children: ChildProcess[] = [];
function cleanup(): void {
  for (const c of children) c.kill('SIGKILL');
}
process.on('exit', cleanup);

async function child<T>(...roleArgs: string[]): Promise<{ info: T; proc: ChildProcess }> {
  const proc = spawn(process.execPath, ['--import', 'tsx', SELF, ...roleArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(proc);
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (c) => reject(new Error(`${roleArgs[0]} exited (${c})`)));
  });
  return { info: JSON.parse(line) as T, proc };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port, noDelay: true }, () => resolve(s));
    s.once('error', reject);
  });
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Round trips of `size`-byte messages on an echo connection; returns sorted ms. */
async function roundTrips(port: number, size: number, n: number): Promise<number[]> {
  const s = await connect(port);
  s.write('E');
  const msg = Buffer.alloc(size, 1);
  const times: number[] = [];
  let got = 0;
  let wake: (() => void) | undefined;
  s.on('data', (b: Buffer) => {
    got += b.length;
    if (got >= size && wake) {
      const w = wake;
      wake = undefined;
      w();
    }
  });
  for (let i = 0; i < n + 50; i++) {
    got = 0;
    const t0 = process.hrtime.bigint();
    const done = new Promise<void>((r) => (wake = r));
    s.write(msg);
    await done;
    // The first 50 warm up (connection, JIT).
    if (i >= 50) times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  s.destroy();
  return times.sort((a, b) => a - b);
}

async function upload(port: number, bytes: number): Promise<number> {
  const s = await connect(port);
  const h = Buffer.alloc(9);
  h[0] = 0x55;
  h.writeBigUInt64LE(BigInt(bytes), 1);
  const done = new Promise<void>((r) => s.once('data', () => r()));
  const t0 = performance.now();
  s.write(h);
  await sendN(s, bytes);
  await done;
  const secs = (performance.now() - t0) / 1000;
  s.destroy();
  return bytes / secs / (1024 * 1024);
}

async function download(port: number, bytes: number): Promise<number> {
  const s = await connect(port);
  const h = Buffer.alloc(9);
  h[0] = 0x44;
  h.writeBigUInt64LE(BigInt(bytes), 1);
  let got = 0;
  const t0 = performance.now();
  const done = new Promise<void>((r) =>
    s.on('data', (b: Buffer) => {
      got += b.length;
      if (got >= bytes) r();
    }),
  );
  s.write(h);
  await done;
  const secs = (performance.now() - t0) / 1000;
  s.destroy();
  return bytes / secs / (1024 * 1024);
}

const f2 = (x: number): string => x.toFixed(2);
const f3 = (x: number): string => x.toFixed(3);

async function main(): Promise<void> {
  const quick = flag('--quick');
  const n = quick ? 500 : 3000;
  const server = await child<{ port: number }>('server');
  const worker = await child<{ id: string; addrs: string[] }>('worker', String(server.info.port));
  const host = await child<{ port: number }>('host', worker.info.id, JSON.stringify(worker.info.addrs));
  const direct = server.info.port;
  const tunnel = host.info.port;

  console.log(`\n## Tunnel vs direct TCP (loopback, ${n} round trips per row, every role in its own process)\n`);
  console.log('| message | direct p50 ms | direct p99 ms | tunnel p50 ms | tunnel p99 ms | added p50 ms |');
  console.log('|---|---|---|---|---|---|');
  for (const size of [64, 16 * 1024]) {
    // Interleaved halves, so that a burst of load elsewhere on the machine hits both alike.
    const d1 = await roundTrips(direct, size, n / 2);
    const t1 = await roundTrips(tunnel, size, n / 2);
    const d2 = await roundTrips(direct, size, n / 2);
    const t2 = await roundTrips(tunnel, size, n / 2);
    const d = [...d1, ...d2].sort((a, b) => a - b);
    const t = [...t1, ...t2].sort((a, b) => a - b);
    console.log(
      `| ${size} B | ${f3(pct(d, 50))} | ${f3(pct(d, 99))} | ${f3(pct(t, 50))} | ${f3(pct(t, 99))} | ${f3(pct(t, 50) - pct(d, 50))} |`,
    );
  }

  const bytes = (quick ? 16 : 64) * 1024 * 1024;
  console.log(`\n## Throughput of one stream (${bytes / 1024 / 1024} MiB)\n`);
  console.log('| direction | direct MiB/s | tunnel MiB/s |');
  console.log('|---|---|---|');
  console.log(`| client -> server | ${f2(await upload(direct, bytes))} | ${f2(await upload(tunnel, bytes))} |`);
  console.log(`| server -> client | ${f2(await download(direct, bytes))} | ${f2(await download(tunnel, bytes))} |`);

  if (!flag('--no-death')) await detection();
  if (!flag('--no-llama')) await llama(quick);
  cleanup();
  process.exit(0);
}

/** How long until a connection's end is seen, from the transport alone (MESH's heartbeats come on top). */
async function detection(): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
  const server = await child<{ port: number }>('server');
  const rows: string[] = [];
  {
    const other = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
    const c = await ep.dial(other.id, other.addrs());
    const inbound = (await other.accept())!;
    const t0 = performance.now();
    inbound.close('bye');
    await c.closed;
    rows.push(`| graceful close by the peer | ${f2((performance.now() - t0) * 1000) } µs |`);
    await other.close();
  }
  {
    const peer = await child<{ id: string; addrs: string[] }>('worker', String(server.info.port));
    const c = await ep.dial(asEndpointId(peer.info.id), peer.info.addrs);
    const t0 = performance.now();
    peer.proc.kill('SIGKILL');
    await c.closed;
    rows.push(`| peer process SIGKILLed | ${f2((performance.now() - t0) / 1000)} s |`);
  }
  console.log('\n## When the transport alone sees a peer go (no heartbeats)\n');
  console.log('| event | seen after |');
  console.log('|---|---|');
  for (const r of rows) console.log(r);
  await ep.close();
}

interface Timings {
  readonly pp: number;
  readonly tg: number;
}

async function llama(quick: boolean): Promise<void> {
  const h = await import('../test/helpers/llama.ts');
  const { generateLlamaGguf } = await import('../src/io/gguf-writer.ts');
  const modelPath = opt('--model') ?? '/tmp/mesh-bench-273m.gguf';
  if (!existsSync(modelPath)) {
    process.stderr.write(`generating ${modelPath} (6 layers, n_embd 768, ff 6912, F16)...\n`);
    await generateLlamaGguf(modelPath, { layers: 6, embd: 768, ff: 6912, type: 'f16', seed: 1 });
  }
  const workerRpc = await h.startRpcServer();
  const hostRpc = await h.startRpcServer();
  const worker = await child<{ id: string; addrs: string[] }>('worker', String(workerRpc.port));
  const host = await child<{ port: number }>('host', worker.info.id, JSON.stringify(worker.info.addrs));
  // ~64 prompt tokens.
  const prompt = Array.from({ length: 16 }, (_, i) => `mesh node ${i} carries`).join(' ');
  const reps = quick ? 2 : 4;

  async function run(first: string): Promise<Timings[]> {
    const s = await h.startLlamaServer({ model: modelPath, rpc: [first, hostRpc.address], tensorSplit: [1, 1] });
    try {
      await h.greedyCompletion(s, prompt, 8); // warm-up
      const out: Timings[] = [];
      for (let i = 0; i < reps; i++) {
        const c = await h.greedyCompletion(s, prompt, 64, { ignore_eos: true });
        const t = c.raw.timings as { prompt_per_second: number; predicted_per_second: number };
        out.push({ pp: t.prompt_per_second, tg: t.predicted_per_second });
      }
      return out;
    } finally {
      await s.stop();
    }
  }
  const med = (xs: number[]): number => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  // Alternate direct and tunnel so that drift on a shared machine hits both.
  const d: Timings[] = [];
  const t: Timings[] = [];
  for (let round = 0; round < 2; round++) {
    d.push(...(await run(workerRpc.address)));
    t.push(...(await run(`127.0.0.1:${host.info.port}`)));
  }
  const dpp = med(d.map((x) => x.pp));
  const dtg = med(d.map((x) => x.tg));
  const tpp = med(t.map((x) => x.pp));
  const ttg = med(t.map((x) => x.tg));
  console.log(`\n## llama.cpp through the tunnel (${modelPath}, -ts 1,1, -t 1, fa off; host's own rpc-server direct and last)\n`);
  console.log('llama-server /completion timings, median of ' + d.length + ' requests each (64-token generation, ~64-token prompt)\n');
  console.log('| first rpc-server reached | prompt tok/s | generation tok/s | ms per generated token |');
  console.log('|---|---|---|---|');
  console.log(`| directly over TCP | ${f2(dpp)} | ${f2(dtg)} | ${f2(1000 / dtg)} |`);
  console.log(`| through the tunnel | ${f2(tpp)} | ${f2(ttg)} | ${f2(1000 / ttg)} |`);
  console.log(`| ratio (tunnel / direct) | ${f3(tpp / dpp)} | ${f3(ttg / dtg)} | +${f2(1000 / ttg - 1000 / dtg)} ms |`);
  await workerRpc.stop();
  await hostRpc.stop();
}

const role = args[0];
if (role === 'server') await roleServer();
else if (role === 'worker') await roleWorker(Number(args[1]));
else if (role === 'host') await roleHost(args[1]!, JSON.parse(args[2]!) as string[]);
else
  await main().catch((err: unknown) => {
    console.error(err);
    cleanup();
    process.exit(1);
  });
