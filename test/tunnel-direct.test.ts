// Tunnels on the direct data path: a tunnel connection tries TCP + TLS first (the key agreed on a `direct`
// stream), falls back to QUIC when the peer has no data port or cannot be reached, tries again on the next
// connection, and the hand-off closes direct connections too. Real TLS on loopback; the mesh connection is
// the in-memory transport, then real iroh endpoints.
import { createConnection, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { DirectPathServer } from '../src/io/transport/direct-path.ts';
import { TunnelService, type TunnelPolicy } from '../src/io/transport/tunnel.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';
import { countingEcho, type CountingEcho } from './support/direct-support.ts';

const log = pino({ level: 'silent' });
const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});


function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => resolve(s));
    s.once('error', reject);
    cleanups.push(() => s.destroy());
  });
}

async function echo(s: Socket, n: number): Promise<void> {
  const payload = Buffer.alloc(n, 0x5a);
  let got = 0;
  await new Promise<void>((resolve) => {
    const onData = (b: Buffer) => {
      got += b.length;
      if (got >= n) {
        s.off('data', onData);
        resolve();
      }
    };
    s.on('data', onData);
    s.write(payload);
  });
}

interface Pair {
  opener: TunnelService;
  acceptor: TunnelService;
  data: DirectPathServer | null;
  target: CountingEcho;
  a: MeshEndpoint;
  b: MeshEndpoint;
}

/** a opens tunnels to b; b's policy lets a's rpc tunnels reach an echo server. */
async function pair(make: () => Promise<MeshEndpoint>, opts: { dataPort: boolean; advertise?: string[]; dataPath?: 'auto' | 'quic' }): Promise<Pair> {
  const a = await make();
  const b = await make();
  cleanups.push(() => a.close(), () => b.close());
  const target = await countingEcho();
  cleanups.push(() => target.close());
  const allow: TunnelPolicy = (peer, kind) => (peer === a.id && kind === 'rpc' ? { host: '127.0.0.1', port: target.port } : { refuse: 'not you' });
  let data: DirectPathServer | null = null;
  if (opts.dataPort) {
    data = new DirectPathServer({ host: '127.0.0.1', port: 0 }, { allow, advertise: () => opts.advertise ?? ['127.0.0.1'], log });
    await data.start();
    cleanups.push(() => data!.close());
  }
  const acceptor = new TunnelService({ allow }, { endpoint: b, log, direct: data });
  const opener = new TunnelService({ allow: () => ({ refuse: 'opener only' }), dataPath: opts.dataPath ?? 'auto', directTimeoutMs: 1_000 }, { endpoint: a, log });
  acceptor.start();
  opener.start();
  cleanups.push(() => opener.close(), () => acceptor.close());
  await a.dial(b.id, b.addrs());
  return { opener, acceptor, data, target, a, b };
}

const memoryNet = new MemoryNetwork();
const backends = [
  { name: 'memory', make: async (): Promise<MeshEndpoint> => memoryNet.createEndpoint({ admission: 'open' }) },
  { name: 'iroh', make: (): Promise<MeshEndpoint> => createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' }) },
];

for (const backend of backends) {
  describe(`tunnels on the direct data path (${backend.name})`, () => {
    it('a tunnel connection takes the direct path: bytes cross TLS, the QUIC tunnel carries none', async () => {
      const p = await pair(backend.make, { dataPort: true });
      const l = await p.opener.listen(p.b.id as EndpointId, 'rpc');
      const s = await connect(l.port);
      await echo(s, 256 * 1024);
      const [mine] = p.opener.tunnels();
      expect(mine).toMatchObject({ peer: p.b.id, kind: 'rpc', side: 'opened', path: 'direct', bytesOut: 256 * 1024, bytesIn: 256 * 1024 });
      expect(p.acceptor.tunnels()).toMatchObject([{ peer: p.a.id, side: 'accepted', path: 'direct' }]);
      expect(p.opener.stats()).toMatchObject({ directOpened: 1, directFallbacks: 0, tcpBytesIn: 0, quicBytesOut: 0 });
      expect(p.acceptor.stats().quicReads).toBe(0);
      expect(p.target.connections()).toBe(1);
    });

    it('falls back to QUIC when the peer has no data port, and says why', async () => {
      const p = await pair(backend.make, { dataPort: false });
      const l = await p.opener.listen(p.b.id as EndpointId, 'rpc');
      const s = await connect(l.port);
      await echo(s, 16 * 1024);
      expect(p.opener.tunnels()).toMatchObject([{ path: 'quic', side: 'opened', bytesOut: 16 * 1024, bytesIn: 16 * 1024 }]);
      expect(p.opener.stats()).toMatchObject({ directOpened: 0, directFallbacks: 1 });
    });

    it('an unreachable data port costs at most the bound, then QUIC serves; the next connection tries direct again', async () => {
      const closed = await countingEcho();
      await closed.close();
      // The acceptor advertises an address where nothing listens.
      const p = await pair(backend.make, { dataPort: true, advertise: ['127.0.0.2'] });
      const l = await p.opener.listen(p.b.id as EndpointId, 'rpc');
      const t0 = Date.now();
      const s = await connect(l.port);
      await echo(s, 1024);
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(p.opener.tunnels()[0]?.path).toBe('quic');
      const s2 = await connect(l.port);
      await echo(s2, 1024);
      expect(p.opener.stats().directFallbacks).toBe(2);
    });

    it('--data-path quic never offers', async () => {
      const p = await pair(backend.make, { dataPort: true, dataPath: 'quic' });
      const l = await p.opener.listen(p.b.id as EndpointId, 'rpc');
      await echo(await connect(l.port), 4096);
      expect(p.opener.stats()).toMatchObject({ directOpened: 0, directFallbacks: 0 });
      expect(p.data!.connections()).toHaveLength(0);
    });

    it('a refused kind is refused on the direct path too; the hand-off closes direct connections both ways', async () => {
      const p = await pair(backend.make, { dataPort: true });
      const http = await p.opener.listen(p.b.id as EndpointId, 'http');
      const refused = await connect(http.port);
      const closed = new Promise<void>((r) => refused.once('close', () => r()));
      refused.on('error', () => {});
      await closed;
      expect(p.target.connections()).toBe(0);

      const l = await p.opener.listen(p.b.id as EndpointId, 'rpc');
      const s = await connect(l.port);
      await echo(s, 1024);
      const gone = new Promise<void>((r) => s.once('close', () => r()));
      s.on('error', () => {});
      expect(await p.acceptor.closeFrom(p.a.id as EndpointId)).toBeGreaterThanOrEqual(1);
      await gone;
      expect(p.acceptor.tunnels()).toHaveLength(0);
    });
  });
}
