// The transport contract against real iroh endpoints on loopback (killed peers are separate processes),
// plus what is iroh's own: the persistent id, relays offline, and bad peers.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint, createIrohRawEndpoint } from '../src/io/transport/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { SecretKey } from '@number0/iroh';
import { transportContract, type RemotePeer, type RemotePeerOptions } from './transport-contract.ts';

const children = new Set<ChildProcess>();
afterAll(() => {
  for (const c of children) c.kill('SIGKILL');
});

/** A mesh endpoint in its own process (test/transport-peer.child.ts). */
export async function spawnIrohPeer(options: RemotePeerOptions = {}): Promise<RemotePeer> {
  const script = fileURLToPath(new URL('./transport-peer.child.ts', import.meta.url));
  const args = [script, options.identity ?? '-', ...(options.dialTo ? [JSON.stringify(options.dialTo)] : [])];
  const child = spawn(process.execPath, ['--import', 'tsx', ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  const lines = createInterface({ input: child.stdout! });
  const first = await new Promise<string>((resolve, reject) => {
    lines.once('line', resolve);
    child.once('exit', (code) => reject(new Error(`peer process exited (${code}) before it was ready`)));
  });
  const { id, addrs, dialed } = JSON.parse(first) as { id: string; addrs: string[]; dialed?: string };
  return { id: asEndpointId(id), addrs, dialed, kill: () => child.kill('SIGKILL') };
}

transportContract({
  name: 'iroh',
  endpoint: (init) => createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', ...init }),
  rawEndpoint: (identity) =>
    createIrohRawEndpoint({
      secretKey: identity ? new Uint8Array(Buffer.from(identity, 'hex')) : ephemeralSecretKey(),
      bindHost: '127.0.0.1',
    }),
  remotePeer: spawnIrohPeer,
  identityAbove: async (id) => {
    for (;;) {
      const key = ephemeralSecretKey();
      if (SecretKey.fromBytes([...key]).public().toString() > id) return Buffer.from(key).toString('hex');
    }
  },
  // QUIC's idle timeout is ~30 s in iroh and not configurable from JS; MESH's heartbeats make it fast.
  deathCeilingMs: 60_000,
});

describe('iroh transport', () => {
  it('keeps the endpoint id for the same secret key', async () => {
    const key = ephemeralSecretKey();
    const a = await createIrohEndpoint({ secretKey: key, bindHost: '127.0.0.1' });
    const id = a.id;
    await a.close();
    const b = await createIrohEndpoint({ secretKey: key, bindHost: '127.0.0.1' });
    expect(b.id).toBe(id);
    expect(id).toMatch(/^[0-9a-f]{64}$/);
    await b.close();
  });

  it('starts with relays on while offline within a bound, and says the relays are unreachable', async () => {
    const t0 = performance.now();
    const ep = await createIrohEndpoint({
      secretKey: ephemeralSecretKey(),
      bindHost: '127.0.0.1',
      relay: 'default',
      relayWaitMs: 2_000,
    });
    const took = performance.now() - t0;
    try {
      // This machine has no internet; with one, the relay is simply online.
      if (ep.relayStatus.state === 'unreachable') expect(ep.relayStatus.reason).toMatch(/relay/);
      else expect(ep.relayStatus.state).toBe('online');
      // The bound is the probe plus the online wait (2 s each): generous, but not a hang.
      expect(took).toBeLessThan(15_000);
      // Direct connections work regardless.
      const b = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
      const c = await ep.dial(b.id, b.addrs());
      expect(c.isDirect()).toBe(true);
      await b.close();
    } finally {
      await ep.close();
    }
  });

  it('with a relay of our own that is down, starts within the bound and says so; a malformed URL is refused', async () => {
    const t0 = performance.now();
    const ep = await createIrohEndpoint({
      secretKey: ephemeralSecretKey(),
      bindHost: '127.0.0.1',
      relay: { url: 'http://127.0.0.1:9/' },
      relayWaitMs: 1_000,
    });
    expect(performance.now() - t0).toBeLessThan(10_000);
    expect(ep.relayStatus).toMatchObject({ state: 'unreachable', reason: expect.stringMatching(/relays answered/) });
    await ep.close();
    await expect(createIrohEndpoint({ secretKey: ephemeralSecretKey(), relay: { url: 'not a url' } })).rejects.toThrow(/bad relay setting/);
  });

  it('with a relay URL that answers HTTP but is no relay, binds with it and reports no home relay in time', async () => {
    const { createServer } = await import('node:http');
    const http = createServer((_req, res) => res.end('not a relay'));
    await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
    const port = (http.address() as { port: number }).port;
    try {
      const ep = await createIrohEndpoint({
        secretKey: ephemeralSecretKey(),
        bindHost: '127.0.0.1',
        relay: { url: `http://127.0.0.1:${port}/` },
        relayWaitMs: 1_000,
      });
      expect(ep.relayStatus).toEqual({ state: 'unreachable', reason: 'no home relay within 1000 ms' });
      // Direct dials still work.
      const b = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
      const c = await ep.dial(b.id, b.addrs().filter((a) => !a.startsWith('http')));
      expect(c.isDirect()).toBe(true);
      await b.close();
      await ep.close();
    } finally {
      http.close();
    }
  });

  it('refuses a wrong key length and a malformed endpoint id clearly', async () => {
    await expect(createIrohEndpoint({ secretKey: new Uint8Array(31) })).rejects.toThrow(/32 bytes/);
    const a = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
    await expect(a.dial(asEndpointId('not-an-id'), ['127.0.0.1:1'])).rejects.toThrow(/not an endpoint id/);
    await a.close();
  });

  it('reports a port already taken as a bind error', async () => {
    const a = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
    const port = Number(a.addrs()[0]!.split(':').pop());
    await expect(
      createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', bindPort: port }),
    ).rejects.toThrow(/could not bind/);
    await a.close();
  });
});
