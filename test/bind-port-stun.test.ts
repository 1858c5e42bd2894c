// `--bind-port` where DNS fails (offline, or a DNS sinkhole): an unresolvable STUN name costs no more than its
// own budget, never escapes as an unhandled rejection, and leaves the fixed port free, so the node starts and
// its endpoint binds that very port (issue 10, item 5). In-process, with the real STUN discovery and iroh.
import { createSocket } from 'node:dgram';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { discoverPublicAddress } from '../src/io/host/stun.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { buildNode, type NodeConfig } from '../src/node.ts';

async function freeUdpPort(): Promise<number> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
  const port = s.address().port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe('--bind-port with an unresolvable STUN server', () => {
  it('the node starts, binds its port, and the token carries the LAN address on it', async () => {
    const bindPort = await freeUdpPort();
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (l: string) => void lines.push(l) });
    const config: NodeConfig = {
      name: 'dns-fails',
      role: 'auto',
      joins: [],
      bindHost: '127.0.0.1',
      bindPort,
      dataPort: null,
      dataPath: 'quic',
      // Both unresolvable: each try resolves, fails, and must close its socket on the bound port.
      stun: ['nonexistent.invalid:3478', 'stun.nonexistent.invalid:19302'],
      relay: { kind: 'none' },
      apiHost: '127.0.0.1',
      port: 0,
      apiKey: null,
      countRpc: false,
    };
    const node = buildNode(config, {
      logger,
      holdings: { secretKey: ephemeralSecretKey(), model: null, vram: null },
      net: { stun: discoverPublicAddress, bind: createIrohEndpoint },
      processes: () => ({}),
    });
    const t0 = performance.now();
    const started = await node.start();
    try {
      // The default budget is 3 s for the whole discovery: the failing names do not add to it.
      expect(performance.now() - t0).toBeLessThan(6_000);
      expect(started.endpoint.addrs()).toContain(`127.0.0.1:${bindPort}`);
      expect(lines.join('')).toMatch(/no public address from STUN/);
      expect(lines.join('')).toMatch(/nonexistent\.invalid/);
    } finally {
      await node.stop('test');
    }
  }, 30_000);
});
