// The link emulator's relays on loopback (test/support/link-emulator.ts): delay each way, loss, rate, order,
// byte counters, cut and restore. Timings are checked against floors (what the shape must add at least) and
// generous ceilings (this machine is small and shared).
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { TCP_MIN_RTO_MS, TcpRelay, UdpRelay, symmetricShape, type LinkRelay } from './support/link-emulator.ts';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A seeded generator (mulberry32): loss and jitter decisions repeat exactly. */
function seeded(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function udpEcho(): Promise<{ port: number }> {
  const s = createSocket('udp4');
  s.on('message', (m, r) => s.send(m, r.port, r.address));
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  cleanups.push(() => new Promise<void>((r) => s.close(() => r())));
  return { port: s.address().port };
}

async function udpClient(): Promise<UdpSocket> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  cleanups.push(() => new Promise<void>((r) => s.close(() => r())));
  return s;
}

async function tcpEcho(): Promise<{ port: number }> {
  const server: Server = createServer((s) => s.pipe(s));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
  return { port: (server.address() as { port: number }).port };
}

async function track<T extends LinkRelay>(relay: Promise<T>): Promise<T> {
  const r = await relay;
  cleanups.push(() => r.close());
  return r;
}

async function tcpClient(port: number): Promise<Socket> {
  const s = connect({ host: '127.0.0.1', port, noDelay: true });
  await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
  cleanups.push(() => void s.destroy());
  return s;
}

/** Sends `bytes` and resolves when as many have come back, with the milliseconds it took. */
function tcpRoundTrip(s: Socket, bytes: Buffer): Promise<{ ms: number; got: Buffer }> {
  const t0 = performance.now();
  const parts: Buffer[] = [];
  let n = 0;
  return new Promise((resolve) => {
    const onData = (c: Buffer) => {
      parts.push(c);
      n += c.length;
      if (n >= bytes.length) {
        s.off('data', onData);
        resolve({ ms: performance.now() - t0, got: Buffer.concat(parts) });
      }
    };
    s.on('data', onData);
    s.write(bytes);
  });
}

describe('UDP relay', () => {
  it('delays each way: a 20 ms link gives round trips of 20 ms and more, never much more; counts both ways', async () => {
    const echo = await udpEcho();
    const relay = await track(UdpRelay.start({ target: { host: '127.0.0.1', port: echo.port }, forward: symmetricShape(20) }));
    const client = await udpClient();
    const rtts: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      const back = new Promise<Buffer>((r) => client.once('message', r));
      client.send(Buffer.alloc(100, i), relay.port, '127.0.0.1');
      expect((await back)[0]).toBe(i);
      rtts.push(performance.now() - t0);
    }
    expect(Math.min(...rtts)).toBeGreaterThanOrEqual(19.5);
    expect(Math.min(...rtts)).toBeLessThan(35);
    const c = relay.counters();
    expect(c.sessions).toBe(1);
    expect(c.forward).toMatchObject({ packets: 10, bytes: 1000, deliveredPackets: 10, lostPackets: 0 });
    expect(c.backward).toMatchObject({ packets: 10, bytes: 1000, deliveredPackets: 10, lostPackets: 0 });
  });

  it('drops datagrams with the loss rate (seeded) and drops everything while cut, until restored', async () => {
    const echo = await udpEcho();
    const relay = await track(UdpRelay.start({ target: { host: '127.0.0.1', port: echo.port }, forward: { delayMs: 0, loss: 0.3 }, backward: { delayMs: 0 }, random: seeded(7) }));
    const client = await udpClient();
    let received = 0;
    client.on('message', () => received++);
    // In bursts of 20: a burst of 400 would overflow the kernel's socket buffers before the relay reads.
    for (let i = 0; i < 400; i++) {
      client.send(Buffer.alloc(10), relay.port, '127.0.0.1');
      if (i % 20 === 19) await new Promise((r) => setTimeout(r, 5));
    }
    await new Promise((r) => setTimeout(r, 300));
    const c = relay.counters();
    expect(c.forward.packets).toBe(400);
    expect(c.forward.lostPackets + c.forward.deliveredPackets).toBe(400);
    expect(c.forward.lostPackets).toBeGreaterThan(80); // 30% of 400 = 120
    expect(c.forward.lostPackets).toBeLessThan(160);
    expect(received).toBe(c.forward.deliveredPackets);

    relay.setShape({ delayMs: 0 });
    relay.cut();
    for (let i = 0; i < 20; i++) client.send(Buffer.alloc(10), relay.port, '127.0.0.1');
    await new Promise((r) => setTimeout(r, 150));
    expect(received).toBe(c.forward.deliveredPackets);
    relay.restore();
    client.send(Buffer.alloc(10), relay.port, '127.0.0.1');
    await new Promise((r) => setTimeout(r, 150));
    expect(received).toBe(c.forward.deliveredPackets + 1);
  });
});

describe('TCP relay', () => {
  it('delays each way and keeps byte order under jitter; counts bytes', async () => {
    const echo = await tcpEcho();
    const relay = await track(TcpRelay.start({ target: { host: '127.0.0.1', port: echo.port }, forward: { delayMs: 10, jitterMs: 8 }, random: seeded(3) }));
    const s = await tcpClient(relay.port);
    const first = await tcpRoundTrip(s, Buffer.from('ping'));
    expect(first.ms).toBeGreaterThanOrEqual(19.5);
    expect(first.ms).toBeLessThan(80);
    // 200 numbered writes, each its own chunk through a jittered line: they must come back in order.
    const all = Buffer.concat(Array.from({ length: 200 }, (_, i) => Buffer.from(`${String(i).padStart(4, '0')};`)));
    const back = new Promise<Buffer>((resolve) => {
      const parts: Buffer[] = [];
      let n = 0;
      s.on('data', (c: Buffer) => {
        parts.push(c);
        n += c.length;
        if (n >= all.length) resolve(Buffer.concat(parts));
      });
    });
    for (let i = 0; i < 200; i++) {
      s.write(all.subarray(i * 5, i * 5 + 5));
      if (i % 20 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    expect((await back).toString()).toBe(all.toString());
    const c = relay.counters();
    expect(c.sessions).toBe(1);
    expect(c.forward.bytes).toBe(4 + all.length);
    expect(c.backward.deliveredBytes).toBe(4 + all.length);
  });

  it('a lost chunk arrives after a retransmission timeout instead of vanishing; rate paces bytes', async () => {
    const echo = await tcpEcho();
    const relay = await track(TcpRelay.start({ target: { host: '127.0.0.1', port: echo.port }, forward: { delayMs: 1, loss: 1 }, backward: { delayMs: 1 } }));
    const s = await tcpClient(relay.port);
    const lost = await tcpRoundTrip(s, Buffer.from('hello'));
    expect(lost.got.toString()).toBe('hello');
    expect(lost.ms).toBeGreaterThanOrEqual(TCP_MIN_RTO_MS);
    expect(relay.counters().forward.lostPackets).toBeGreaterThanOrEqual(1);

    relay.setShape({ delayMs: 0, bytesPerSecond: 1_000_000 });
    const big = await tcpRoundTrip(s, Buffer.alloc(100_000, 1));
    // 100 kB each way at 1 MB/s: at least 100 ms one way (the echo's way is paced too, overlapping).
    expect(big.ms).toBeGreaterThanOrEqual(95);
    expect(big.got.length).toBe(100_000);
  });

  it('cut holds bytes and new connections until restore, then delivers them in order', async () => {
    const echo = await tcpEcho();
    const relay = await track(TcpRelay.start({ target: { host: '127.0.0.1', port: echo.port } }));
    const s = await tcpClient(relay.port);
    await tcpRoundTrip(s, Buffer.from('before'));
    relay.cut();
    expect(relay.isCut).toBe(true);
    let got = '';
    s.on('data', (c: Buffer) => (got += c.toString()));
    s.write('during');
    const late = await tcpClient(relay.port);
    let lateGot = '';
    late.on('data', (c: Buffer) => (lateGot += c.toString()));
    late.write('new');
    await new Promise((r) => setTimeout(r, 200));
    expect(got).toBe('');
    expect(lateGot).toBe('');
    relay.restore();
    await new Promise((r) => setTimeout(r, 200));
    expect(got).toBe('during');
    expect(lateGot).toBe('new');
  });
});
