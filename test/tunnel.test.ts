// TCP -> QUIC -> TCP tunnels, over the in-memory and the iroh transport: bytes intact both ways, half-close,
// backpressure, the policy, the hand-off (closeFrom) and no leaks after 200 abrupt resets.
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { randomBytes } from 'node:crypto';
import { TunnelService, type TunnelCodec, type TunnelPolicy } from '../src/io/transport/tunnel.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';
import { within } from './transport-contract.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Backend {
  readonly name: string;
  readonly codec: TunnelCodec;
  endpoint(): Promise<MeshEndpoint>;
}

const net = new MemoryNetwork();
const memory = async (): Promise<MeshEndpoint> => net.createEndpoint({ admission: 'open' });
const iroh = (): Promise<MeshEndpoint> => createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
const backends: Backend[] = [
  { name: 'memory', codec: 'raw', endpoint: memory },
  { name: 'memory', codec: 'deflate', endpoint: memory },
  { name: 'iroh', codec: 'deflate', endpoint: iroh },
  { name: 'iroh', codec: 'raw', endpoint: iroh },
];

/** A TCP server on loopback whose connections get `onConn`; tracks its sockets. */
async function tcpServer(onConn: (s: Socket) => void): Promise<{ server: Server; port: number; sockets: Set<Socket> }> {
  const sockets = new Set<Socket>();
  const server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    onConn(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const addr = server.address();
  return { server, port: typeof addr === 'object' && addr ? addr.port : 0, sockets };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => resolve(s));
    s.once('error', reject);
  });
}

/** All bytes until the socket ends (or closes). */
function collect(s: Socket): Promise<Buffer> {
  const parts: Buffer[] = [];
  s.on('data', (b: Buffer) => parts.push(b));
  return new Promise((resolve) => s.once('close', () => resolve(Buffer.concat(parts))));
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 255;
  return b;
}

function tcpHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TCPWrap').length;
}

for (const backend of backends) {
  describe(`tunnel over ${backend.name}, ${backend.codec} codec`, () => {
    const cleanups: (() => Promise<void> | void)[] = [];
    afterEach(async () => {
      for (const f of cleanups.splice(0).reverse()) await f();
    });

    /** host --(rpc tunnel)--> worker --> target port; returns the host's local port. */
    async function setup(targetPort: number, policy?: TunnelPolicy) {
      const host = await backend.endpoint();
      const worker = await backend.endpoint();
      cleanups.push(() => host.close(), () => worker.close());
      const workerTunnels = new TunnelService(
        { allow: policy ?? ((id, kind) => (id === host.id && kind === 'rpc' ? { host: '127.0.0.1', port: targetPort } : { refuse: 'not our host' })) },
        { endpoint: worker },
      );
      workerTunnels.start();
      const hostTunnels = new TunnelService(
        { allow: () => ({ refuse: 'host takes no tunnels' }), codec: backend.codec },
        { endpoint: host },
      );
      hostTunnels.start();
      cleanups.push(() => workerTunnels.close(), () => hostTunnels.close());
      await host.dial(worker.id, worker.addrs());
      const listener = await hostTunnels.listen(worker.id, 'rpc');
      return { host, worker, workerTunnels, hostTunnels, listener };
    }

    it('carries 8 MiB each way intact, and a half-close passes through', async () => {
      // The target echoes everything and ends when the client ends: half-close must cross the tunnel.
      const target = await tcpServer((s) => s.pipe(s));
      cleanups.push(() => new Promise<void>((r) => target.server.close(() => r())));
      const { listener, workerTunnels, hostTunnels } = await setup(target.port);
      const c = await connect(listener.port);
      const back = collect(c);
      // Half compressible, half not: both frame kinds of the deflate codec.
      const data = Buffer.concat([pattern(4 * 1024 * 1024, 5), randomBytes(4 * 1024 * 1024)]);
      // Uneven writes, as an RPC client makes them.
      for (let o = 0; o < data.length; ) {
        const n = Math.min(data.length - o, [1, 13, 4096, 65_536, 300_000][o % 5]!);
        if (!c.write(data.subarray(o, o + n))) await new Promise((r) => c.once('drain', r));
        o += n;
      }
      c.end();
      const got = await within(back, 60_000, 'echo through the tunnel');
      expect(got.length).toBe(data.length);
      expect(got.equals(data)).toBe(true);
      await within(waitFor(() => workerTunnels.stats().pipes === 0 && hostTunnels.stats().pipes === 0), 5_000, 'pipes end');
    }, 90_000);

    it('applies backpressure end to end: a target that does not read stalls the client, nothing piles up', async () => {
      let paused: Socket | undefined;
      const target = await tcpServer((s) => {
        s.pause();
        paused = s;
      });
      cleanups.push(() => new Promise<void>((r) => target.server.close(() => r())));
      const { listener } = await setup(target.port);
      const c = await connect(listener.port);
      c.on('error', () => {});
      cleanups.push(() => void c.destroy());
      const chunk = pattern(64 * 1024, 1);
      let accepted = 0;
      const deadline = Date.now() + 2_000;
      // Write as the socket allows; without backpressure the tunnel would swallow hundreds of MiB.
      while (Date.now() < deadline) {
        const ok = c.write(chunk);
        accepted += chunk.length;
        if (!ok) {
          const r = await Promise.race([new Promise((res) => c.once('drain', () => res('drain'))), sleep(deadline - Date.now())]);
          if (r !== 'drain') break;
        }
      }
      expect(accepted).toBeLessThan(96 * 1024 * 1024);
      expect(paused).toBeDefined();
      // Reading at the far end releases it all.
      let received = 0;
      paused!.on('data', (b: Buffer) => (received += b.length));
      paused!.resume();
      await within(waitFor(() => received >= accepted), 30_000, 'drain after resume');
      expect(received).toBe(accepted);
    }, 60_000);

    it('the policy refuses tunnels from anyone but the plan host, and the client sees a close', async () => {
      const target = await tcpServer((s) => s.pipe(s));
      cleanups.push(() => new Promise<void>((r) => target.server.close(() => r())));
      const { listener, workerTunnels } = await setup(target.port, () => ({ refuse: 'not the host of our plan' }));
      const c = await connect(listener.port);
      const back = collect(c);
      c.write('hello');
      const got = await within(back, 5_000, 'refused tunnel closes');
      expect(got.length).toBe(0);
      expect(target.sockets.size).toBe(0);
      expect(workerTunnels.stats().pipes).toBe(0);
    });

    it('a target that is down closes the client socket', async () => {
      const target = await tcpServer(() => {});
      const port = target.port;
      await new Promise<void>((r) => target.server.close(() => r()));
      const { listener } = await setup(port);
      const c = await connect(listener.port);
      await within(collect(c), 10_000, 'client closed');
    });

    it('closeFrom(host) closes every tunnel of that host at once (the hand-off)', async () => {
      const target = await tcpServer((s) => s.pipe(s));
      cleanups.push(() => new Promise<void>((r) => target.server.close(() => r())));
      const { listener, workerTunnels, host } = await setup(target.port);
      const clients = await Promise.all([1, 2, 3].map(() => connect(listener.port)));
      const ends = clients.map((c) => collect(c));
      for (const c of clients) c.write('x');
      await within(waitFor(() => target.sockets.size === 3 && workerTunnels.stats().pipes === 3), 5_000, 'three tunnels up');
      expect(await workerTunnels.closeFrom(host.id as EndpointId)).toBe(3);
      await within(Promise.all(ends), 5_000, 'all clients closed');
      await within(waitFor(() => target.sockets.size === 0), 5_000, 'target sockets closed');
      expect(workerTunnels.stats().pipes).toBe(0);
    });

    it('leaks no socket or pipe after 200 abrupt resets from either end', async () => {
      const targetSide: Socket[] = [];
      const target = await tcpServer((s) => {
        targetSide.push(s);
        s.on('data', () => s.write('ack'));
      });
      cleanups.push(() => new Promise<void>((r) => target.server.close(() => r())));
      const { listener, workerTunnels, hostTunnels } = await setup(target.port);
      await sleep(50);
      const before = tcpHandles();
      for (let i = 0; i < 200; i++) {
        const c = await connect(listener.port);
        c.on('error', () => {});
        const ack = new Promise((r) => c.once('data', r));
        c.write(pattern(1000, i));
        await within(ack, 10_000, `ack ${i}`);
        if (i % 2 === 0) {
          // The client aborts (RST).
          c.resetAndDestroy();
        } else {
          // The target aborts; the client must see its socket close.
          const closed = new Promise((r) => c.once('close', r));
          targetSide.at(-1)!.resetAndDestroy();
          await within(closed, 10_000, `client close ${i}`);
        }
      }
      await within(
        waitFor(() => workerTunnels.stats().pipes === 0 && hostTunnels.stats().pipes === 0 && target.sockets.size === 0),
        20_000,
        'all pipes gone',
      );
      await within(waitFor(() => tcpHandles() <= before), 10_000, `tcp handles back to ${before}`);
      expect(tcpHandles()).toBeLessThanOrEqual(before);
    }, 120_000);
  });
}

async function waitFor(cond: () => boolean): Promise<void> {
  while (!cond()) await sleep(10);
}
