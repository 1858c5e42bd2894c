// What strangers knocking cost a node's API: the latency of GET /v1/models on a solo serving node, with and
// without 1000 stranger streams hammering its endpoint (fresh iroh keys, no mesh secret, http streams with a
// GET for llama-server: since issue 10 none is served, each waits for a verdict that never comes and is reset,
// and connections past the handshake bound are cut at once). The hammer runs in its own process, so that the
// measuring client's timings are not its event loop's. Prints a markdown table.
//
//   npx tsx bench/stranger.bench.ts [--n 300] [--streams 1000]
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { createIrohRawEndpoint } from '../src/io/transport/iroh-transport.ts';
import type { RawConnection, RawEndpoint, RawStream } from '../src/io/transport/transport.ts';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { hostServing, makeE2eMesh } from '../test/e2e-support.ts';
import { describeMachine } from './machine.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};

const GET = new TextEncoder().encode('GET /props HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');

/** The hammer (child process): keeps `streams` stranger http streams open against the node, redialing as it is cut. */
async function hammer(id: string, addrs: string[], streams: number): Promise<void> {
  // 20 connections of 50 streams: more connections than the per-address bound (16) lets wait at once, and more
  // streams per connection than may wait for a verdict (16): the bounds at work, not just the wait.
  const perConn = 50;
  const conns = Math.ceil(streams / perConn);
  const stats = { dials: 0, cut: 0, opened: 0, reset: 0, bytes: 0 };
  const eps: RawEndpoint[] = [];
  for (let i = 0; i < conns; i++) eps.push(await createIrohRawEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1' }));
  let stop = false;
  process.on('SIGTERM', () => {
    stop = true;
    process.stdout.write(JSON.stringify(stats) + '\n');
    process.exit(0);
  });
  const one = async (ep: RawEndpoint): Promise<void> => {
    while (!stop) {
      let conn: RawConnection;
      try {
        conn = await ep.dial(asEndpointId(id), addrs, AbortSignal.timeout(5_000));
        stats.dials++;
      } catch {
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      const reads: Promise<void>[] = [];
      for (let i = 0; i < perConn && !stop; i++) {
        let s: RawStream;
        try {
          s = await conn.openBi();
          await s.write(Uint8Array.of(0x03, 0x00));
          await s.write(GET);
          stats.opened++;
        } catch {
          break;
        }
        reads.push(
          s.read().then(
            (c) => void (stats.bytes += c?.length ?? 0),
            () => void stats.reset++,
          ),
        );
      }
      const info = await conn.closed;
      if (info.code === 4) stats.cut++;
      await Promise.allSettled(reads);
    }
  };
  process.stdout.write('ready\n');
  await Promise.all(eps.map(one));
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

async function measure(api: string, n: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const res = await fetch(`${api}/v1/models`);
    await res.arrayBuffer();
    if (!res.ok) throw new Error(`GET /v1/models: ${res.status}`);
    out.push(performance.now() - t0);
  }
  return out;
}

async function main(): Promise<void> {
  if (args[0] === '--hammer') {
    await hammer(args[1]!, JSON.parse(args[2]!) as string[], Number(args[3]));
    return;
  }
  const n = Number(opt('--n') ?? 300);
  const streams = Number(opt('--streams') ?? 1000);
  console.log(describeMachine());
  const mesh = await makeE2eMesh();
  try {
    const node = await mesh.start({ name: 'solo', vram: 2 });
    await node.waitStatus(hostServing, 120_000, 'a serving solo host');
    const invite = decodeInviteToken(node.token);
    await measure(node.api, 20); // warm-up
    const quiet = await measure(node.api, n);

    const child = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--hammer', invite.inviter, JSON.stringify(invite.addrs), String(streams)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    while (!out.includes('ready')) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 2_000)); // let it reach full pressure
    const busy = await measure(node.api, n);
    const busy2 = await measure(node.api, n);
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
    const stats = JSON.parse(out.split('\n').filter((l) => l.startsWith('{')).pop() ?? '{}') as Record<string, number>;
    const alive = (await node.status()).node.id === invite.inviter;
    await new Promise((r) => setTimeout(r, 6_000)); // the strangers' last connections time out
    const after = await measure(node.api, n);

    const row = (name: string, xs: number[]): string =>
      `| ${name} | ${xs.length} | ${pct(xs, 50).toFixed(2)} | ${pct(xs, 95).toFixed(2)} | ${pct(xs, 99).toFixed(2)} | ${Math.max(...xs).toFixed(2)} |`;
    console.log('');
    console.log('GET /v1/models on a solo serving node (ms)');
    console.log('');
    console.log('| condition | requests | p50 | p95 | p99 | max |');
    console.log('|---|---:|---:|---:|---:|---:|');
    console.log(row('quiet', quiet));
    console.log(row(`${streams} stranger streams`, busy));
    console.log(row(`${streams} stranger streams (2nd run)`, busy2));
    console.log(row('quiet again', after));
    console.log('');
    const q = [...quiet, ...after];
    const b = [...busy, ...busy2];
    console.log(`p50 ratio busy/quiet: ${(pct(b, 50) / pct(q, 50)).toFixed(2)}; p99 ratio: ${(pct(b, 99) / pct(q, 99)).toFixed(2)}`);
    console.log(
      `strangers: ${stats.dials ?? 0} connections (${stats.cut ?? 0} cut at once by the handshake bound), ${stats.opened ?? 0} http streams opened, ` +
        `${stats.reset ?? 0} reset, ${stats.bytes ?? 0} bytes served to them; node alive after: ${alive}`,
    );
  } finally {
    await mesh.cleanup();
  }
}

await main();
process.exit(0);
