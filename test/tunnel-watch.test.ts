// The host's watch over its rpc tunnels (src/io/transport/tunnel-watch.ts): a request that owes a reply and hears
// nothing for max(floor, factor x p99 of the worker's reply times) is a hung stage, on the QUIC path and on the
// direct path alike; idle connections and slow-but-answering stages are not. And the evidence the tunnels give
// about the peer behind them: the far side ending a direct connection.
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { DirectPathServer } from '../src/io/transport/direct-path.ts';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { TunnelService, type TunnelPolicy } from '../src/io/transport/tunnel.ts';
import { RpcReplyClock, type StageStall } from '../src/io/transport/tunnel-watch.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';

const log = pino({ level: 'silent' });
const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** An RPC request frame: cmd u8 | size u64 LE | payload. HELLO (14) and GET_ALLOC_SIZE (13) get replies; SET_TENSOR (6) none. */
function request(cmd: number, size = 0): Buffer {
  const b = Buffer.alloc(9 + size);
  b[0] = cmd;
  b.writeBigUInt64LE(BigInt(size), 1);
  return b;
}
function reply(size: number): Buffer {
  const b = Buffer.alloc(8 + size);
  b.writeBigUInt64LE(BigInt(size), 0);
  return b;
}

/** A stand-in rpc-server: answers every HELLO with a 4-byte reply after `delayMs`, or never while `silent`. */
async function fakeRpcServer(): Promise<{ port: number; delayMs: number; silent: boolean; sockets: Set<Socket>; server: Server }> {
  const state = { port: 0, delayMs: 0, silent: false, sockets: new Set<Socket>(), server: null as unknown as Server };
  state.server = createServer((s) => {
    state.sockets.add(s);
    s.on('error', () => {});
    s.on('data', (b: Buffer) => {
      // Every request in these tests is a bare 9-byte header.
      for (let i = 0; i + 9 <= b.length; i += 9) {
        if (b[i] === 6) continue;
        if (state.silent) continue;
        setTimeout(() => s.write(reply(4)), state.delayMs);
      }
    });
  });
  await new Promise<void>((r) => state.server.listen(0, '127.0.0.1', () => r()));
  state.port = (state.server.address() as { port: number }).port;
  cleanups.push(() => {
    for (const s of state.sockets) s.destroy();
    return new Promise((r) => state.server.close(() => r(undefined)));
  });
  return state;
}

const net = new MemoryNetwork();

async function meshPair(dataPath: 'auto' | 'quic', target: number, stallWatch: { floorMs: number; factor?: number }) {
  const a = net.createEndpoint({ admission: 'open' });
  const b = net.createEndpoint({ admission: 'open' });
  cleanups.push(() => a.close(), () => b.close());
  const allow: TunnelPolicy = (peer, kind) => (peer === a.id && kind === 'rpc' ? { host: '127.0.0.1', port: target } : { refuse: 'not you' });
  let data: DirectPathServer | null = null;
  if (dataPath === 'auto') {
    data = new DirectPathServer({ host: '127.0.0.1', port: 0 }, { allow, advertise: () => ['127.0.0.1'], log });
    await data.start();
    cleanups.push(() => data!.close());
  }
  const stalls: StageStall[] = [];
  const evidence: { peer: string; path: string; why: string }[] = [];
  const acceptor = new TunnelService({ allow }, { endpoint: b, log, direct: data });
  const opener = new TunnelService(
    { allow: () => ({ refuse: 'opener only' }), dataPath, stallWatch: { ...stallWatch, checkEveryMs: 25 } },
    { endpoint: a, log, report: { stall: (s) => stalls.push(s), evidence: (peer, path, why) => evidence.push({ peer, path, why }) } },
  );
  acceptor.start();
  opener.start();
  cleanups.push(() => opener.close(), () => acceptor.close());
  await a.dial(b.id, b.addrs());
  const listener = await opener.listen(b.id, 'rpc', { planId: 'plan-1' });
  return { a, b: b as MeshEndpoint, opener, acceptor, data, stalls, evidence, port: listener.port };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => resolve(s));
    s.once('error', reject);
    s.on('error', () => {});
    cleanups.push(() => s.destroy());
  });
}

/** Sends HELLO and waits for its 12-byte answer. */
function hello(s: Socket): Promise<void> {
  return new Promise((resolve) => {
    let got = 0;
    const on = (b: Buffer) => {
      got += b.length;
      if (got >= 12) {
        s.off('data', on);
        resolve();
      }
    };
    s.on('data', on);
    s.write(request(14));
  });
}

describe('RpcReplyClock', () => {
  it('waits from a request that owes a reply, not from fire-and-forget ones; any reply byte is progress', () => {
    const times: number[] = [];
    const c = new RpcReplyClock((ms) => times.push(ms));
    c.request(request(6, 16), 0); // SET_TENSOR: no reply owed
    expect(c.waiting(100)).toBe(0);
    c.request(request(13), 100); // GET_ALLOC_SIZE: owes one
    expect(c.waiting(400)).toBe(300);
    const r = reply(8);
    c.reply(r.subarray(0, 4), 500); // a piece: progress, no reply done yet
    expect(c.waiting(600)).toBe(100);
    expect(times).toEqual([]);
    c.reply(r.subarray(4), 700);
    expect(times).toEqual([600]);
    expect(c.waiting(5000)).toBe(0);
    // Two owed at once: the second's time starts when the first's reply ended.
    c.request(Buffer.concat([request(14), request(14)]), 1000);
    c.reply(reply(4), 1100);
    c.reply(reply(4), 1150);
    expect(times).toEqual([600, 100, 50]);
  });

  it('turns off on bytes that are not RPC: it never judges what it cannot parse', () => {
    const c = new RpcReplyClock(() => {});
    c.request(Buffer.from('GET / HTTP/1.1\r\n\r\n'), 0);
    expect(c.off).toBe(true);
    expect(c.waiting(60_000)).toBe(0);
  });
});

describe.each(['quic', 'auto'] as const)('the stage watch, data path %s', (dataPath) => {
  it('reports a stage that stops answering, once, within the bound; idle and answering connections are not hung', async () => {
    const rpc = await fakeRpcServer();
    const m = await meshPair(dataPath, rpc.port, { floorMs: 400 });
    const s = await connect(m.port);
    for (let i = 0; i < 20; i++) await hello(s);
    await sleep(800); // idle: nothing owed, nothing reported
    expect(m.stalls).toEqual([]);
    rpc.silent = true;
    const t0 = performance.now();
    s.write(request(14));
    while (m.stalls.length === 0 && performance.now() - t0 < 10_000) await sleep(10);
    const took = performance.now() - t0;
    expect(m.stalls).toHaveLength(1);
    expect(m.stalls[0]).toMatchObject({ peer: m.b.id, planId: 'plan-1', boundMs: 400 });
    expect(m.stalls[0]!.waitedMs).toBeGreaterThanOrEqual(400);
    expect(took).toBeGreaterThanOrEqual(390);
    expect(took).toBeLessThan(5_000); // a generous ceiling: the check runs every 25 ms
    await sleep(300);
    expect(m.stalls).toHaveLength(1); // once per connection
  });

  it("the bound follows the stage's reply times: a slow stage that answers is not hung", async () => {
    const rpc = await fakeRpcServer();
    rpc.delayMs = 60;
    // Floor 100 ms: a fixed bound would fire at a 300 ms reply; 20 x p99 (~60 ms) = ~1.2 s does not.
    const m = await meshPair(dataPath, rpc.port, { floorMs: 100, factor: 20 });
    const s = await connect(m.port);
    for (let i = 0; i < 10; i++) await hello(s);
    rpc.delayMs = 300;
    for (let i = 0; i < 3; i++) await hello(s);
    expect(m.stalls).toEqual([]);
    expect(m.opener).toBeDefined();
  });
});

describe('evidence from the direct data path', () => {
  it("the peer's side ending a direct connection is reported as direct evidence; our own close is not", async () => {
    const rpc = await fakeRpcServer();
    const m = await meshPair('auto', rpc.port, { floorMs: 10_000 });
    const s = await connect(m.port);
    await hello(s);
    expect(m.opener.tunnels().map((t) => t.path)).toEqual(['direct']);
    s.destroy(); // our local client goes: the relay ends from our side
    await sleep(200);
    expect(m.evidence).toEqual([]);
    const s2 = await connect(m.port);
    await hello(s2);
    m.data!.closeFrom(m.a.id); // the worker's side drops it (as a dying worker's kernel would)
    const t0 = performance.now();
    while (m.evidence.length === 0 && performance.now() - t0 < 5_000) await sleep(10);
    expect(m.evidence).toEqual([{ peer: m.b.id, path: 'direct', why: expect.any(String) }]);
  });
});

describe('evidence from a QUIC tunnel', () => {
  async function quicPair(network: MemoryNetwork) {
    const rpc = await fakeRpcServer();
    const a = network.createEndpoint({ admission: 'open' });
    const b = network.createEndpoint({ admission: 'open' });
    cleanups.push(() => a.close(), () => b.close());
    const evidence: { peer: string; path: string; why: string }[] = [];
    const acceptor = new TunnelService({ allow: () => ({ host: '127.0.0.1', port: rpc.port }) }, { endpoint: b, log });
    const opener = new TunnelService({ allow: () => ({ refuse: 'opener only' }), dataPath: 'quic' }, { endpoint: a, log, report: { evidence: (peer, path, why) => evidence.push({ peer, path, why }) } });
    acceptor.start();
    opener.start();
    cleanups.push(() => opener.close(), () => acceptor.close());
    await a.dial(b.id, b.addrs());
    const s = await connect((await opener.listen(b.id, 'rpc', { planId: 'p' })).port);
    await hello(s);
    return { a, b, evidence };
  }

  it('a lost connection under a tunnel is quic evidence; a connection closed on purpose is not', async () => {
    const lossy = new MemoryNetwork({ idleTimeoutMs: 300 });
    const m = await quicPair(lossy);
    lossy.kill(m.b.id); // the worker dies silently: the connection is lost after the idle timeout
    const t0 = performance.now();
    while (m.evidence.length === 0 && performance.now() - t0 < 5_000) await sleep(10);
    expect(m.evidence).toEqual([{ peer: m.b.id, path: 'quic', why: expect.stringMatching(/connection closed/) }]);

    const calm = await quicPair(new MemoryNetwork());
    await calm.b.close(); // an application close (the peer leaving): its own events say so
    await sleep(300);
    expect(calm.evidence).toEqual([]);
  });
});
