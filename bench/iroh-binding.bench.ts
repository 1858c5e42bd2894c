// Where the time of a round trip over the bare iroh binding (`@number0/iroh` 1.1.0) goes, variant by variant:
// the number[] conversion each way, the read size, readExact with a known length, awaits per message.
// Two bare endpoints in two processes (this one the client, a child the echo server), no tunnel, no TCP.
//
//   npx tsx bench/iroh-binding.bench.ts [--quick] [--rounds N] [--iters N]
//
// Every variant runs once per round, in a rotating order, on its own bi stream; the table gives the median
// over rounds of each round's median round trip, and the range of the round medians (the noise).
// The binding takes and gives only number[] (Vec<u8> in Rust): napi-rs reads and builds that array one
// element per N-API call, on the JS thread, so that cost is paid on both sides of every hop.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Endpoint, EndpointAddr, EndpointId, presetMinimal, type RecvStream, type SendStream } from '@number0/iroh';
import { describeMachine } from './machine.ts';

const SELF = fileURLToPath(import.meta.url);
const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};
const QUICK = args.includes('--quick');
const ROUNDS = Number(opt('--rounds') ?? (QUICK ? 5 : 9));
const ITERS = Number(opt('--iters') ?? (QUICK ? 30 : 60));
const ALPN = [...new TextEncoder().encode('iroh-binding-bench/0')];

// ---------------------------------------------------------------------------------------------------------
// Conversions (what iroh-transport.ts could do at the boundary)

type ToArr = (u8: Uint8Array) => number[];
type FromArr = (a: number[]) => Uint8Array;

const toLoop: ToArr = (u8) => {
  const n = u8.length;
  const a = new Array<number>(n);
  for (let i = 0; i < n; i++) a[i] = u8[i]!;
  return a;
};
const toArrayFrom: ToArr = (u8) => Array.from(u8);
const toPush: ToArr = (u8) => {
  const a: number[] = [];
  for (let i = 0; i < u8.length; i++) a.push(u8[i]!);
  return a;
};
/** One array kept and refilled (its length set per message). */
let kept: number[] = [];
const toKept: ToArr = (u8) => {
  const n = u8.length;
  if (kept.length !== n) kept.length = n;
  for (let i = 0; i < n; i++) kept[i] = u8[i]!;
  return kept;
};
/** Arrays kept by exact length (the binding copies a number[] before writeAll returns, so reuse is safe). */
const byLen = new Map<number, number[]>();
const toByLen: ToArr = (u8) => {
  const n = u8.length;
  let a = byLen.get(n);
  if (a === undefined) byLen.set(n, (a = new Array<number>(n)));
  for (let i = 0; i < n; i++) a[i] = u8[i]!;
  return a;
};
/** At most this many elements per fresh array: bigger ones cost ~50x more per element to build here. */
const PIECE = 8 * 1024;
async function writePieces(send: SendStream, u8: Uint8Array): Promise<void> {
  for (let o = 0; o < u8.length; o += PIECE) await send.writeAll(toLoop(u8.subarray(o, o + PIECE)));
}
const fromU8From: FromArr = (a) => Uint8Array.from(a);
const fromLoop: FromArr = (a) => {
  const n = a.length;
  const u = new Uint8Array(n);
  for (let i = 0; i < n; i++) u[i] = a[i]!;
  return u;
};
const fromBuffer: FromArr = (a) => Buffer.from(a);
const fromNew: FromArr = (a) => new Uint8Array(a);

// ---------------------------------------------------------------------------------------------------------
// Stream header: mode u8, read size u32 LE, message length u32 LE (the server's side of each variant).
//   'r': read(readSize) until len bytes, each chunk to Uint8Array (loop), joined, back to number[], writeAll
//   'x': readExact(len), to Uint8Array and back, writeAll            (a known length: one read per message)
//   'n': readExact(len), writeAll of the same number[]               (no conversion in JS: the binding's floor)
//   'k': as 'r', but the number[] written is one kept per length, refilled
//   'p': as 'r', but written in pieces of at most 8 KiB, each writeAll awaited in turn

async function bindEp(): Promise<Endpoint> {
  const b = Endpoint.builder();
  presetMinimal(b);
  b.alpns([ALPN]);
  b.bindAddr('127.0.0.1:0');
  return b.bind();
}

async function readN(recv: RecvStream, n: number, size: number, counter?: { reads: number }): Promise<Uint8Array> {
  const first = await recv.read(size);
  if (counter) counter.reads++;
  if (first.length === n) return fromLoop(first);
  const out = new Uint8Array(n);
  out.set(first, 0);
  let got = first.length;
  if (got === 0) throw new Error('stream ended');
  while (got < n) {
    const a = await recv.read(Math.min(size, n - got));
    if (counter) counter.reads++;
    if (a.length === 0) throw new Error('stream ended');
    for (let i = 0; i < a.length; i++) out[got + i] = a[i]!;
    got += a.length;
  }
  return out;
}

async function roleServer(): Promise<void> {
  const ep = await bindEp();
  const conns: unknown[] = [];
  process.stdout.write(JSON.stringify({ id: ep.id().toString(), addrs: ep.addr().directAddresses() }) + '\n');
  for (;;) {
    const inc = await ep.acceptNext();
    if (inc === null) return;
    const conn = await (await inc.accept()).connect();
    conns.push(conn);
    void (async () => {
      for (;;) {
        let bi;
        try {
          bi = await conn.acceptBi();
        } catch {
          return;
        }
        conns.push(bi);
        void serveStream(bi.send, bi.recv).catch(() => {});
      }
    })();
  }
}

async function serveStream(send: SendStream, recv: RecvStream): Promise<void> {
  const h = Buffer.from(await recv.readExact(9));
  const mode = String.fromCharCode(h[0]!);
  const size = h.readUInt32LE(1);
  const len = h.readUInt32LE(5);
  for (;;) {
    if (mode === 'n') {
      const a = await recv.readExact(len);
      await send.writeAll(a);
    } else if (mode === 'x') {
      const u = fromLoop(await recv.readExact(len));
      await send.writeAll(toLoop(u));
    } else {
      const u = await readN(recv, len, size);
      if (mode === 'k') await send.writeAll(toByLen(u));
      else if (mode === 'p') await writePieces(send, u);
      else await send.writeAll(toLoop(u));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Client variants

interface Variant {
  readonly name: string;
  readonly server: 'r' | 'x' | 'n' | 'k' | 'p';
  readonly readSize: number;
  /** One round trip of `msg` on (send, recv). */
  rt(send: SendStream, recv: RecvStream, msg: Uint8Array, pre: number[], reads: { reads: number }): Promise<void>;
}

const R64K = 64 * 1024;

function readLoop(to: ToArr, from: FromArr, size: number, awaitWrite: boolean): Variant['rt'] {
  return async (send, recv, msg, _pre, reads) => {
    const w = send.writeAll(to(msg));
    if (awaitWrite) await w;
    let got = 0;
    const r = recv.read(size);
    if (!awaitWrite) await w;
    let a = await r;
    for (;;) {
      reads.reads++;
      if (a.length === 0) throw new Error('stream ended');
      from(a);
      got += a.length;
      if (got >= msg.length) break;
      a = await recv.read(size);
    }
  };
}

function variants(len: number): Variant[] {
  return [
    { name: 'product today: loop to number[], read(64 KiB) loop, Uint8Array.from', server: 'r', readSize: R64K, rt: readLoop(toLoop, fromU8From, R64K, false) },
    { name: 'Array.from(u8) to number[]', server: 'r', readSize: R64K, rt: readLoop(toArrayFrom, fromU8From, R64K, false) },
    { name: 'push() into [] to number[]', server: 'r', readSize: R64K, rt: readLoop(toPush, fromU8From, R64K, false) },
    { name: 'one kept number[] refilled', server: 'r', readSize: R64K, rt: readLoop(toKept, fromU8From, R64K, false) },
    { name: 'number[] kept per length, both sides', server: 'k', readSize: R64K, rt: readLoop(toByLen, fromU8From, R64K, false) },
    {
      name: 'written in <= 8 KiB pieces (each awaited), both sides',
      server: 'p',
      readSize: R64K,
      rt: async (send, recv, msg, _pre, reads) => {
        const w = writePieces(send, msg);
        let got = 0;
        const r = recv.read(R64K);
        await w;
        let a = await r;
        for (;;) {
          reads.reads++;
          if (a.length === 0) throw new Error('stream ended');
          fromU8From(a);
          got += a.length;
          if (got >= msg.length) break;
          a = await recv.read(R64K);
        }
      },
    },
    { name: 'back with a loop into new Uint8Array', server: 'r', readSize: R64K, rt: readLoop(toLoop, fromLoop, R64K, false) },
    { name: 'back with Buffer.from(a)', server: 'r', readSize: R64K, rt: readLoop(toLoop, fromBuffer, R64K, false) },
    { name: 'back with new Uint8Array(a)', server: 'r', readSize: R64K, rt: readLoop(toLoop, fromNew, R64K, false) },
    { name: 'read(message size) both sides', server: 'r', readSize: len, rt: readLoop(toLoop, fromU8From, len, false) },
    { name: 'read(1 MiB) both sides', server: 'r', readSize: 1 << 20, rt: readLoop(toLoop, fromU8From, 1 << 20, false) },
    { name: 'write awaited before the read is asked', server: 'r', readSize: R64K, rt: readLoop(toLoop, fromU8From, R64K, true) },
    {
      name: 'readExact(known length) both sides',
      server: 'x',
      readSize: 0,
      rt: async (send, recv, msg, _pre, reads) => {
        const w = send.writeAll(toLoop(msg));
        const r = recv.readExact(msg.length);
        await w;
        fromU8From(await r);
        reads.reads++;
      },
    },
    {
      name: 'floor: readExact, no JS conversion (number[] reused)',
      server: 'n',
      readSize: 0,
      rt: async (send, recv, msg, pre, reads) => {
        const w = send.writeAll(pre);
        const r = recv.readExact(msg.length);
        await w;
        await r;
        reads.reads++;
      },
    },
  ];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** JS-only cost of each conversion (no binding): microseconds per 16 KiB, median of 200. */
function conversionCosts(len: number): Array<[string, number]> {
  const u8 = new Uint8Array(len).map((_, i) => (i * 31) & 255);
  const arr = toLoop(u8);
  const time = (f: () => unknown): number => {
    const xs: number[] = [];
    for (let k = 0; k < 200; k++) {
      const t = process.hrtime.bigint();
      f();
      xs.push(Number(process.hrtime.bigint() - t) / 1e3);
    }
    return median(xs);
  };
  return [
    ['to number[]: indexed loop into new Array(n) (today)', time(() => toLoop(u8))],
    ['to number[]: Array.from(u8)', time(() => toArrayFrom(u8))],
    ['to number[]: push()', time(() => toPush(u8))],
    ['to number[]: one kept array refilled', time(() => toKept(u8))],
    ['to number[]: kept per length', time(() => toByLen(u8))],
    ['to number[]: two fresh 8 KiB arrays', time(() => [toLoop(u8.subarray(0, len >> 1)), toLoop(u8.subarray(len >> 1))])],
    ['to Uint8Array: Uint8Array.from(a) (today)', time(() => fromU8From(arr))],
    ['to Uint8Array: loop into new Uint8Array', time(() => fromLoop(arr))],
    ['to Uint8Array: Buffer.from(a)', time(() => fromBuffer(arr))],
    ['to Uint8Array: new Uint8Array(a)', time(() => fromNew(arr))],
  ];
}

async function roleClient(): Promise<void> {
  console.log(describeMachine());
  console.log(`@number0/iroh 1.1.0, loopback, ${ROUNDS} rounds x ${ITERS} round trips per variant and size (+5 warm-up)\n`);
  for (const len of [16 * 1024]) {
    console.log(`JS-only conversion, ${len} bytes (median of 200, µs):\n`);
    console.log('| conversion | µs |\n|---|---:|');
    for (const [n, us] of conversionCosts(len)) console.log(`| ${n} | ${us.toFixed(1)} |`);
    console.log();
  }
  const child = spawn(process.execPath, [...process.execArgv, SELF, '--role', 'server'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((resolve) => createInterface({ input: child.stdout! }).once('line', resolve));
  const { id, addrs } = JSON.parse(line) as { id: string; addrs: string[] };
  const ep = await bindEp();
  const conn = await ep.connect(new EndpointAddr(EndpointId.fromString(id), null, addrs), ALPN);

  // Probe: how long writeAll takes to return its promise (napi-rs reads the number[] into a Vec<u8> then).
  {
    const bi = await conn.openBi();
    const hdr = Buffer.alloc(9);
    hdr[0] = 'n'.charCodeAt(0);
    hdr.writeUInt32LE(16 * 1024, 5);
    await bi.send.writeAll([...hdr]);
    const pre = toLoop(new Uint8Array(16 * 1024));
    const xs: number[] = [];
    for (let k = 0; k < 60; k++) {
      const t = process.hrtime.bigint();
      const w = bi.send.writeAll(pre);
      xs.push(Number(process.hrtime.bigint() - t) / 1e6);
      await w;
      await bi.recv.readExact(16 * 1024);
    }
    console.log(`Synchronous part of writeAll(16 KiB number[]) (napi-rs reading the array): ${median(xs).toFixed(2)} ms median\n`);
  }

  for (const len of [64, 16 * 1024]) {
    const vs = variants(len);
    const rounds: number[][] = vs.map(() => []);
    const readsPer: number[] = vs.map(() => 0);
    const msg = new Uint8Array(len).map((_, i) => (i * 7) & 255);
    const pre = toLoop(msg);
    const streams = await Promise.all(
      vs.map(async (v) => {
        const bi = await conn.openBi();
        const hdr = Buffer.alloc(9);
        hdr[0] = v.server.charCodeAt(0);
        hdr.writeUInt32LE(v.readSize, 1);
        hdr.writeUInt32LE(len, 5);
        await bi.send.writeAll([...hdr]);
        return bi;
      }),
    );
    for (let r = 0; r < ROUNDS; r++) {
      for (let j = 0; j < vs.length; j++) {
        const i = (j + r) % vs.length; // rotating order: no variant always runs first or last
        const v = vs[i]!;
        const bi = streams[i]!;
        const reads = { reads: 0 };
        for (let k = 0; k < 5; k++) await v.rt(bi.send, bi.recv, msg, pre, reads);
        reads.reads = 0;
        const xs: number[] = [];
        for (let k = 0; k < ITERS; k++) {
          const t = process.hrtime.bigint();
          await v.rt(bi.send, bi.recv, msg, pre, reads);
          xs.push(Number(process.hrtime.bigint() - t) / 1e6);
        }
        rounds[i]!.push(median(xs));
        readsPer[i]! += reads.reads / ITERS / ROUNDS;
      }
    }
    const base = median(rounds[0]!);
    console.log(`Round trip, ${len} B message (ms: median of ${ROUNDS} round medians; range = lowest..highest round median):\n`);
    console.log('| variant | median ms | range ms | vs today | client reads/msg |\n|---|---:|---:|---:|---:|');
    vs.forEach((v, i) => {
      const m = median(rounds[i]!);
      const lo = Math.min(...rounds[i]!);
      const hi = Math.max(...rounds[i]!);
      const rel = i === 0 ? '-' : `${(((m - base) / base) * 100).toFixed(0)}%`;
      console.log(`| ${v.name} | ${m.toFixed(len < 1024 ? 3 : 2)} | ${lo.toFixed(2)}..${hi.toFixed(2)} | ${rel} | ${readsPer[i]!.toFixed(1)} |`);
    });
    console.log();
  }
  console.log(describeMachine());
  child.kill();
  await ep.close();
  process.exit(0);
}

if (opt('--role') === 'server') void roleServer();
else void roleClient();
