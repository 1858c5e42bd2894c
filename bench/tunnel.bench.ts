// Measures what the TCP -> iroh QUIC -> TCP tunnel costs, side by side with direct TCP in one run, and prints
// markdown tables: small-message round trips (p50/p99), throughput per stream, how fast a peer's end is
// seen without heartbeats, and llama.cpp tokens/s with one rpc-server behind the tunnel (host's own last).
//
//   npx tsx bench/tunnel.bench.ts [--quick] [--no-llama] [--no-death] [--traffic-only] [--model PATH]
//
// Every role runs in its own process, as in a real mesh: the client (this process), the host node's tunnel,
// the worker node's tunnel, and the TCP server behind it; so no two of them share an event loop.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describeMachine } from './machine.ts';
import { TunnelService, type TunnelCodec } from '../src/io/transport/tunnel.ts';
import { DirectPathServer, newTicket } from '../src/io/transport/direct-path.ts';
import { connect as tlsConnect, createServer as createTlsServer } from 'node:tls';
import { pino } from 'pino';

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

/** Random bytes: the worst case for the deflate codec (it must notice and back off). */
const NOISE = randomBytes(64 * 1024);

async function sendN(s: Socket, n: number): Promise<void> {
  const chunk = NOISE;
  while (n > 0) {
    const c = n >= chunk.length ? chunk : chunk.subarray(0, n);
    n -= c.length;
    if (!s.write(c)) await new Promise((r) => s.once('drain', r));
  }
}

async function roleWorker(targetPort: number, batchRpc: boolean): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
  const allow = () => ({ host: '127.0.0.1', port: targetPort });
  // Its data port answers hosts that ask for the direct path (those started with 'direct').
  const direct = new DirectPathServer({ host: '127.0.0.1', port: 0 }, { allow, advertise: () => ['127.0.0.1'], log: pino({ level: 'silent' }) });
  await direct.start();
  const t = new TunnelService({ allow, batchRpc }, { endpoint: ep, direct });
  t.start();
  void (async () => {
    while ((await ep.accept()) !== null);
  })();
  process.stdout.write(JSON.stringify({ id: ep.id, addrs: ep.addrs() }) + '\n');
}

async function roleHost(workerId: string, workerAddrs: string[], codec: TunnelCodec | 'direct', batchRpc: boolean): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
  const dataPath = codec === 'direct' ? 'auto' : 'quic';
  const t = new TunnelService({ allow: () => ({ refuse: 'host' }), codec: codec === 'direct' ? 'deflate' : codec, batchRpc, dataPath }, { endpoint: ep });
  await ep.dial(asEndpointId(workerId), workerAddrs);
  const l = await t.listen(asEndpointId(workerId), 'rpc');
  process.stdout.write(JSON.stringify({ port: l.port }) + '\n');
}

/** The worker's data port alone, with tickets made up front: what llama-server (patch 0003) dials itself. */
async function roleDataPort(targetPort: number): Promise<void> {
  const direct = new DirectPathServer(
    { host: '127.0.0.1', port: 0, ticketTtlMs: 3_600_000, maxTicketsPerPeer: 64 },
    { allow: () => ({ host: '127.0.0.1', port: targetPort }), advertise: () => ['127.0.0.1'], log: pino({ level: 'silent' }) },
  );
  await direct.start();
  const tickets = Array.from({ length: 32 }, () => newTicket());
  for (const t of tickets) direct.offer(asEndpointId('b'.repeat(64)), 'rpc', t);
  process.stdout.write(JSON.stringify({ port: direct.port, tickets: tickets.map((t) => ({ id: t.id, key: t.key.toString('hex') })) }) + '\n');
}

/** TLS 1.3 PSK echo with nothing behind it: what TLS alone costs. */
async function roleTlsEcho(): Promise<void> {
  const key = randomBytes(32);
  const server = createTlsServer({ ciphers: 'TLS_AES_128_GCM_SHA256', minVersion: 'TLSv1.3', pskCallback: () => key }, (s) => {
    s.setNoDelay(true);
    s.on('error', () => {});
    s.pipe(s);
  });
  server.listen(0, '127.0.0.1', () => {
    const a = server.address();
    process.stdout.write(JSON.stringify({ port: typeof a === 'object' && a ? a.port : 0, key: key.toString('hex') }) + '\n');
  });
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

/** How a path is reached: a TCP port (an echo behind it wants the 'E' mode byte first), or a TLS one. */
type Target = number | { readonly tls: number; readonly identity: string; readonly key: string; readonly mode: boolean };

function connect(target: Target): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (typeof target === 'number') {
      const s = createConnection({ host: '127.0.0.1', port: target, noDelay: true }, () => resolve(s));
      s.once('error', reject);
      return;
    }
    const s = tlsConnect(
      {
        host: '127.0.0.1',
        port: target.tls,
        ciphers: 'TLS_AES_128_GCM_SHA256',
        minVersion: 'TLSv1.3',
        maxVersion: 'TLSv1.3',
        checkServerIdentity: () => undefined,
        pskCallback: () => ({ psk: Buffer.from(target.key, 'hex'), identity: target.identity }),
      },
      () => resolve(s),
    );
    s.setNoDelay(true);
    s.once('error', reject);
  });
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Round trips of `size`-byte messages on an echo connection; returns sorted ms. */
async function roundTrips(target: Target, size: number, n: number): Promise<number[]> {
  const s = await connect(target);
  if (typeof target === 'number' || target.mode) s.write('E');
  const msg = NOISE.subarray(0, size);
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

async function upload(port: Target, bytes: number): Promise<number> {
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

async function download(port: Target, bytes: number): Promise<number> {
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
  console.log(describeMachine());
  const quick = flag('--quick');
  if (flag('--traffic-only')) {
    await trafficOnly();
    cleanup();
    process.exit(0);
  }
  const n = quick ? 500 : 3000;
  const server = await child<{ port: number }>('server');
  const worker = await child<{ id: string; addrs: string[] }>('worker', String(server.info.port), '0');
  const raw = await child<{ port: number }>('host', worker.info.id, JSON.stringify(worker.info.addrs), 'raw', '0');
  const deflate = await child<{ port: number }>('host', worker.info.id, JSON.stringify(worker.info.addrs), 'deflate', '0');
  const tls = await child<{ port: number }>('host', worker.info.id, JSON.stringify(worker.info.addrs), 'direct', '0');
  // Random echo traffic is not RPC, so RPC batching would switch itself off here: codecs only.
  // The legs of the direct path, one at a time: TLS alone; TLS from this process (as llama-server dials with
  // patch 0003) through the worker's data port relay; a Node relay at each end.
  const tlsEcho = await child<{ port: number; key: string }>('tlsecho');
  const dataPort = await child<{ port: number; tickets: { id: string; key: string }[] }>('dataport', String(server.info.port));
  let nextTicket = 0;
  const viaDataPort = (): Target => {
    const t = dataPort.info.tickets[nextTicket++]!;
    return { tls: dataPort.info.port, identity: t.id, key: t.key, mode: true };
  };
  const paths: [string, Target | (() => Target)][] = [
    ['direct TCP', server.info.port],
    ['TLS alone (echo in a TLS server, no relay)', { tls: tlsEcho.info.port, identity: 'x', key: tlsEcho.info.key, mode: false }],
    ['TLS from the client -> worker data-port relay -> TCP (patch 0003)', viaDataPort],
    ['direct data path (TLS, Node relay each end)', tls.info.port],
    ['tunnel, raw codec', raw.info.port],
    ['tunnel, deflate codec', deflate.info.port],
  ];

  console.log(`\n## Round trips of random messages (loopback, ${n} per cell, every role in its own process)\n`);
  console.log('| message | path | p50 ms | p99 ms | added p50 ms |');
  console.log('|---|---|---|---|---|');
  for (const size of [64, 16 * 1024]) {
    // Interleaved halves, so that a burst of load elsewhere on the machine hits every path alike.
    const res = new Map<string, number[]>(paths.map(([name]) => [name, []]));
    for (let half = 0; half < 2; half++) {
      for (const [name, target] of paths) res.get(name)!.push(...(await roundTrips(typeof target === 'function' ? target() : target, size, n / 2)));
    }
    const base = pct(res.get('direct TCP')!.sort((x, y) => x - y), 50);
    for (const [name] of paths) {
      const t = res.get(name)!.sort((x, y) => x - y);
      const added = name === 'direct TCP' ? '' : f3(pct(t, 50) - base);
      console.log(`| ${size} B | ${name} | ${f3(pct(t, 50))} | ${f3(pct(t, 99))} | ${added} |`);
    }
  }

  const bytes = (quick ? 8 : 32) * 1024 * 1024;
  console.log(`\n## Throughput of one stream (${bytes / 1024 / 1024} MiB of random bytes)\n`);
  console.log('| path | client -> server MiB/s | server -> client MiB/s |');
  console.log('|---|---|---|');
  for (const [name, target] of paths) {
    const t = (): Target => (typeof target === 'function' ? target() : target);
    if (typeof target === 'object' && !target.mode) continue; // an echo cannot count bytes
    console.log(`| ${name} | ${f2(await upload(t(), bytes))} | ${f2(await download(t(), bytes))} |`);
  }

  if (!flag('--no-death')) await detection();
  if (!flag('--no-llama')) await llama(quick);
  cleanup();
  process.exit(0);
}

/** How long until a connection's end is seen, from the transport alone (MESH's heartbeats come on top). */
async function detection(): Promise<void> {
  const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
  const server = await child<{ port: number }>('server');
  const rows: string[] = [];
  {
    const other = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
    const c = await ep.dial(other.id, other.addrs());
    const inbound = (await other.accept())!;
    const t0 = performance.now();
    inbound.close('bye');
    await c.closed;
    rows.push(`| graceful close by the peer | ${f2(performance.now() - t0)} ms |`);
    await other.close();
  }
  {
    const peer = await child<{ id: string; addrs: string[] }>('worker', String(server.info.port), '0');
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

interface BenchRow {
  readonly n_prompt: number;
  readonly n_gen: number;
  readonly avg_ts: number;
}

async function llama(quick: boolean): Promise<void> {
  const h = await import('../test/helpers/llama.ts');
  const { generateLlamaGguf } = await import('../src/io/gguf/gguf-writer.ts');
  const bins = h.llamaBinaries();
  const llamaBench = `${bins.dir}/llama-bench`;
  if (!existsSync(llamaBench)) throw new Error(`${llamaBench} not found: build the llama-bench target`);
  const modelPath = opt('--model') ?? '/tmp/mesh-bench-273m.gguf';
  if (!existsSync(modelPath)) {
    process.stderr.write(`generating ${modelPath} (6 layers, n_embd 768, ff 6912, F16)...\n`);
    await generateLlamaGguf(modelPath, { layers: 6, embd: 768, ff: 6912, type: 'f16', seed: 1 });
  }
  const workerRpc = await h.startRpcServer();
  const hostRpc = await h.startRpcServer();
  // A plain worker (every TCP chunk sent at once) for the plain tunnel, a batching one for the others.
  const plainWorker = await child<{ id: string; addrs: string[] }>('worker', String(workerRpc.port), '0');
  const worker = await child<{ id: string; addrs: string[] }>('worker', String(workerRpc.port), '1');
  const host = async (w: typeof worker, codec: TunnelCodec | 'direct', batch: boolean): Promise<string> =>
    `127.0.0.1:${(await child<{ port: number }>('host', w.info.id, JSON.stringify(w.info.addrs), codec, batch ? '1' : '0')).info.port}`;
  const reps = 2;
  // Many short alternating rounds rather than a few long ones: on a shared machine load comes in bursts.
  const rounds = quick ? 1 : 3;
  const paths: [string, string][] = [
    ['directly over TCP', workerRpc.address],
    ['tunnel, plain (raw codec, no batching)', await host(plainWorker, 'raw', false)],
    ['tunnel, raw codec + RPC batching', await host(worker, 'raw', true)],
    ['tunnel, deflate codec + RPC batching (the QUIC fallback)', await host(worker, 'deflate', true)],
    ['direct data path (TLS, Node relay each end)', await host(worker, 'direct', true)],
  ];
  const pp = new Map<string, number[]>(paths.map(([n]) => [n, []]));
  const tg = new Map<string, number[]>(paths.map(([n]) => [n, []]));
  // Paths alternate, round after round, so that drift on a shared machine hits all of them.
  for (let r = 0; r < rounds; r++) {
    for (const [name, first] of paths) {
      const { stdout } = await promisify(execFile)(
        llamaBench,
        ['-m', modelPath, '-rpc', `${first},${hostRpc.address}`, '-ts', '1/1', '-fa', '0', '-t', '1', '-p', '64', '-n', '64', '-r', String(reps), '-o', 'json'],
        { maxBuffer: 16 * 1024 * 1024, timeout: 600_000 },
      );
      for (const row of JSON.parse(stdout) as BenchRow[]) (row.n_gen > 0 ? tg : pp).get(name)!.push(row.avg_ts);
    }
  }
  const median = (xs: number[]): number => {
    const v = [...xs].sort((a, b) => a - b);
    const m = Math.floor(v.length / 2);
    return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
  };
  const range = (xs: number[]): string => `${f2(Math.min(...xs))}-${f2(Math.max(...xs))}`;
  const dpp = median(pp.get(paths[0]![0])!);
  const dtg = median(tg.get(paths[0]![0])!);
  console.log(
    `\n## llama-bench through the tunnel (${modelPath}; -ts 1/1 -fa 0 -t 1 -p 64 -n 64 -r ${reps}; ${rounds} alternating round(s); the host's own rpc-server is direct and last)\n`,
  );
  console.log('Medians of the rounds (min-max in brackets); ratios are medians over direct\'s median.\n');
  console.log('| first rpc-server reached | pp64 tok/s | tg64 tok/s | pp ratio | tg ratio | ms per generated token |');
  console.log('|---|---|---|---|---|---|');
  for (const [name] of paths) {
    const p = pp.get(name)!;
    const t = tg.get(name)!;
    console.log(
      `| ${name} | ${f2(median(p))} (${range(p)}) | ${f2(median(t))} (${range(t)}) | ${f3(median(p) / dpp)} | ${f3(median(t) / dtg)} | ${f2(1000 / median(t))} |`,
    );
  }
  await trafficPerToken(h, modelPath, workerRpc, hostRpc);
  await workerRpc.stop();
  await hostRpc.stop();
}

async function trafficOnly(): Promise<void> {
  const h = await import('../test/helpers/llama.ts');
  const modelPath = opt('--model') ?? '/tmp/mesh-bench-273m.gguf';
  const workerRpc = await h.startRpcServer();
  const hostRpc = await h.startRpcServer();
  try {
    await trafficPerToken(h, modelPath, workerRpc, hostRpc);
  } finally {
    await workerRpc.stop();
    await hostRpc.stop();
  }
}

/**
 * What one generated token puts through the tunnel, per codec: QUIC writes and bytes each way. Both tunnel
 * ends run in this process here (only counters are read, no timings).
 */
async function trafficPerToken(
  h: typeof import('../test/helpers/llama.ts'),
  modelPath: string,
  workerRpc: { port: number },
  hostRpc: { address: string },
): Promise<void> {
  console.log('\n## Tunnel traffic per generated token (llama-server, 32 tokens, counters of both tunnel ends)\n');
  console.log('| tunnel | host -> worker: writes | bytes in | bytes on the wire | worker -> host: writes | bytes on the wire |');
  console.log('|---|---|---|---|---|---|');
  const variants: [string, TunnelCodec, boolean][] = [
    ['raw, no batching', 'raw', false],
    ['raw + RPC batching', 'raw', true],
    ['deflate + RPC batching', 'deflate', true],
  ];
  for (const [label, codec, batchRpc] of variants) {
    const host = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
    const worker = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
    const wt = new TunnelService({ allow: () => ({ host: '127.0.0.1', port: workerRpc.port }), batchRpc }, { endpoint: worker });
    wt.start();
    const ht = new TunnelService({ allow: () => ({ refuse: 'host' }), codec, batchRpc }, { endpoint: host });
    await host.dial(worker.id, worker.addrs());
    const l = await ht.listen(worker.id, 'rpc');
    // Loading sends half the weights through both tunnel ends in this one process: minutes on a busy machine.
    const s = await h.startLlamaServer({
      model: modelPath,
      rpc: [`127.0.0.1:${l.port}`, hostRpc.address],
      tensorSplit: [1, 1],
      readyTimeoutMs: 600_000,
    });
    try {
      await h.greedyCompletion(s, 'hello world', 1);
      const snap = () => ({ h: ht.stats(), w: wt.stats() });
      const a = snap();
      await h.greedyCompletion(s, 'hello world', 1);
      const b = snap();
      await h.greedyCompletion(s, 'hello world', 33, { ignore_eos: true });
      const c = snap();
      // The same request with 33 tokens instead of 1: the difference is 32 tokens of generation alone.
      type K = 'quicWrites' | 'tcpBytesIn' | 'quicBytesOut';
      const per = (side: 'h' | 'w', k: K): string => ((c[side][k] - b[side][k] - (b[side][k] - a[side][k])) / 32).toFixed(1);
      console.log(
        `| ${label} | ${per('h', 'quicWrites')} | ${per('h', 'tcpBytesIn')} | ${per('h', 'quicBytesOut')} | ${per('w', 'quicWrites')} | ${per('w', 'quicBytesOut')} |`,
      );
    } finally {
      await s.stop();
      await ht.close();
      await wt.close();
      await host.close();
      await worker.close();
    }
  }
}

const role = args[0];
if (role === 'server') await roleServer();
else if (role === 'worker') await roleWorker(Number(args[1]), args[2] === '1');
else if (role === 'dataport') await roleDataPort(Number(args[1]));
else if (role === 'tlsecho') await roleTlsEcho();
else if (role === 'host') await roleHost(args[1]!, JSON.parse(args[2]!) as string[], args[3] as TunnelCodec | 'direct', args[4] === '1');
else
  await main().catch((err: unknown) => {
    console.error(err);
    cleanup();
    process.exit(1);
  });
