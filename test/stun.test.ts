// STUN discovery against a STUN server on loopback (this machine has no internet), and its failures.
import { createSocket, type Socket } from 'node:dgram';
import { createRequire } from 'node:module';
import { afterEach, describe, expect, it } from 'vitest';
import { StunError, discoverPublicAddress, parseStunServer, retrySchedule } from '../src/io/host/stun.ts';

interface StunServer {
  on(ev: string, f: (req: { transactionId: Buffer }, rinfo: { address: string; port: number }) => void): void;
  send(msg: unknown, port: number, host: string): void;
  close(): void;
}
const stun = createRequire(import.meta.url)('stun') as {
  createServer(o: { type: 'udp4'; socket: Socket }): StunServer;
  createMessage(type: number, transactionId: Buffer): { addXorAddress(a: string, p: number): void };
  constants: { STUN_BINDING_RESPONSE: number; STUN_EVENT_BINDING_REQUEST: string };
};

const closers: (() => void)[] = [];
afterEach(() => {
  for (const c of closers.splice(0)) c();
});

/** A STUN server that answers every binding request with the address it saw. */
async function stunServer(): Promise<number> {
  // Our own socket, so that we know its port.
  const socket = createSocket('udp4');
  await new Promise<void>((r) => socket.bind(0, '127.0.0.1', r));
  const server = stun.createServer({ type: 'udp4', socket });
  let seen = 0;
  server.on(stun.constants.STUN_EVENT_BINDING_REQUEST, (req, rinfo) => {
    seen++;
    // The answer must carry the request's transaction id, or the client ignores it.
    const msg = stun.createMessage(stun.constants.STUN_BINDING_RESPONSE, req.transactionId);
    msg.addXorAddress(rinfo.address, rinfo.port);
    server.send(msg, rinfo.port, rinfo.address);
  });
  closers.push(() => {
    server.close();
    socket.close();
  });
  void seen;
  return socket.address().port;
}

/** A UDP port that swallows everything: a STUN server that never answers. */
async function blackHole(): Promise<number> {
  const s: Socket = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  closers.push(() => s.close());
  return s.address().port;
}

describe('stun', () => {
  it('finds the address as a STUN server sees it', async () => {
    const port = await stunServer();
    const r = await discoverPublicAddress({ servers: [`127.0.0.1:${port}`], timeoutMs: 2_000 });
    expect(r.address).toBe('127.0.0.1');
    expect(r.port).toBeGreaterThan(0);
    expect(r.server).toBe(`127.0.0.1:${port}`);
  });

  it('reports the port of a chosen local socket (the one iroh will bind)', async () => {
    const port = await stunServer();
    const probe = createSocket('udp4');
    await new Promise<void>((r) => probe.bind(0, '127.0.0.1', r));
    const local = probe.address().port;
    await new Promise<void>((r) => probe.close(() => r()));
    const res = await discoverPublicAddress({ servers: [`127.0.0.1:${port}`], timeoutMs: 2_000, localPort: local });
    expect(res.port).toBe(local);
  });

  it('takes the first answer when some servers are silent', async () => {
    const silent = await blackHole();
    const port = await stunServer();
    const r = await discoverPublicAddress({ servers: [`127.0.0.1:${silent}`, `127.0.0.1:${port}`], timeoutMs: 2_000 });
    expect(r.server).toBe(`127.0.0.1:${port}`);
  });

  it('gives up within the bound with a message naming the servers when none answers', async () => {
    const silent = await blackHole();
    const t0 = performance.now();
    const err = await discoverPublicAddress({ servers: [`127.0.0.1:${silent}`], timeoutMs: 800 }).catch((e: unknown) => e);
    const took = performance.now() - t0;
    expect(err).toBeInstanceOf(StunError);
    expect((err as Error).message).toMatch(new RegExp(`no STUN server answered within 800 ms \\(tried 127\\.0\\.0\\.1:${silent}\\)`));
    expect(took).toBeGreaterThan(500);
    expect(took).toBeLessThan(5_000);
  });

  it('the default public servers fail cleanly offline (or answer, with internet)', async () => {
    const t0 = performance.now();
    const r = await discoverPublicAddress({ timeoutMs: 1_500 }).then(
      (x) => x.address,
      (e: unknown) => e,
    );
    if (r instanceof Error) {
      expect(r).toBeInstanceOf(StunError);
      expect(r.message).toMatch(/no STUN server answered.*stun\.l\.google\.com:19302/);
    } else expect(r).toMatch(/^\d+\.\d+\.\d+\.\d+$/);
    expect(performance.now() - t0).toBeLessThan(6_000);
  });

  it('parses --stun values and rejects bad ones clearly', () => {
    expect(parseStunServer('stun.example.org:3479')).toEqual({ host: 'stun.example.org', port: 3479 });
    expect(parseStunServer('10.0.0.1')).toEqual({ host: '10.0.0.1', port: 3478 });
    expect(() => parseStunServer('host:99999')).toThrow(/port must be/);
    expect(() => parseStunServer('[::1]:3478')).toThrow(/IPv6/);
    expect(() => parseStunServer(':3478')).toThrow(/expected host:port/);
  });

  it('schedules retransmissions that end within the budget', () => {
    for (const budget of [100, 800, 1_500, 3_000, 10_000]) {
      const { timeout, maxTimeout, retries } = retrySchedule(budget);
      let total = 0;
      for (let k = 0; k <= retries; k++) total += Math.min(timeout * 2 ** k, maxTimeout);
      expect(total).toBeLessThanOrEqual(budget);
      expect(retries).toBeGreaterThanOrEqual(1);
    }
  });
});

describe('stun: failures leave nothing behind (--bind-port)', () => {
  /** A UDP port that is free now. */
  async function freePort(): Promise<number> {
    const probe = createSocket('udp4');
    await new Promise<void>((r) => probe.bind(0, '127.0.0.1', r));
    const port = probe.address().port;
    await new Promise<void>((r) => probe.close(() => r()));
    return port;
  }
  async function canBind(port: number): Promise<boolean> {
    const s = createSocket('udp4');
    const ok = await new Promise<boolean>((r) => {
      s.once('error', () => r(false));
      s.bind(port, () => r(true));
    });
    await new Promise<void>((r) => (ok ? s.close(() => r()) : r()));
    return ok;
  }

  it('an unresolvable STUN name costs at most its budget, never throws out, and frees the bound port', async () => {
    const local = await freePort();
    const stunPort = await stunServer();
    const t0 = performance.now();
    // The unresolvable one first: the socket of each try must be closed before the next binds the port.
    const r = await discoverPublicAddress({ servers: ['nonexistent.invalid:3478', `127.0.0.1:${stunPort}`], timeoutMs: 2_000, localPort: local });
    expect(r.server).toBe(`127.0.0.1:${stunPort}`);
    expect(r.port).toBe(local);
    expect(performance.now() - t0).toBeLessThan(2_500);
    expect(await canBind(local)).toBe(true);
  });

  it('only unresolvable names: a StunError naming the cause, and the port is free at once', async () => {
    const local = await freePort();
    const err = await discoverPublicAddress({ servers: ['nonexistent.invalid:3478', 'also-not.invalid:3478'], timeoutMs: 1_000, localPort: local }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StunError);
    expect((err as Error).message).toMatch(/nonexistent\.invalid:3478: (cannot resolve|resolving)/);
    expect(await canBind(local)).toBe(true);
  });

  it('a silent server with a bound port: the deadline aborts the try and frees the port', async () => {
    const local = await freePort();
    const silent = await blackHole();
    const err = await discoverPublicAddress({ servers: [`127.0.0.1:${silent}`], timeoutMs: 400, localPort: local }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StunError);
    expect(await canBind(local)).toBe(true);
    // No retransmission may fire on the closed socket afterwards (it would throw out of a timer).
    await new Promise((r) => setTimeout(r, 600));
  });

  it('the port already taken: a StunError, not a crash', async () => {
    const taken = createSocket('udp4');
    await new Promise<void>((r) => taken.bind(0, r));
    closers.push(() => taken.close());
    const stunPort = await stunServer();
    const err = await discoverPublicAddress({ servers: [`127.0.0.1:${stunPort}`], timeoutMs: 500, localPort: taken.address().port }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StunError);
    expect((err as Error).message).toMatch(/EADDRINUSE/);
  });
});
