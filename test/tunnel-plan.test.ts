// Protocol 2: a host's rpc tunnel carries the plan id its llama-server runs (the rpc stream's header on QUIC,
// the `direct` offer on the data path, and the tickets llama-server dials with itself), and a worker admits
// it only for the plan of its rpcTunnelPolicy, with a logged reason otherwise. Two real NodeTunnels (the
// product's policy, tunnelDecision), over the in-memory and the iroh transport, QUIC only and direct.
import { createConnection, type Socket } from 'node:net';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { NodeTunnels } from '../src/actors/tunnels.actor.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import type { NodeContext } from '../src/machines/node-context.ts';
import { within } from './transport-contract.ts';
import { countingEcho } from './support/direct-support.ts';

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const memoryNet = new MemoryNetwork();
const backends = [
  { name: 'memory', make: async (): Promise<MeshEndpoint> => memoryNet.createEndpoint({ admission: 'open' }) },
  { name: 'iroh', make: (): Promise<MeshEndpoint> => createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' }) },
];

async function until(ok: () => boolean): Promise<void> {
  while (!ok()) await new Promise((r) => setTimeout(r, 10));
}


/** Connects to "127.0.0.1:PORT"; resolves with what happened to a 4 KiB echo: `echoed`, or `closed` with nothing back. */
async function tryEcho(address: string): Promise<'echoed' | 'closed'> {
  const s: Socket = createConnection({ host: '127.0.0.1', port: Number(address.split(':')[1]) });
  cleanups.push(() => s.destroy());
  s.on('error', () => {});
  let got = 0;
  return await new Promise((resolve) => {
    s.on('data', (b: Buffer) => {
      got += b.length;
      if (got >= 4096) resolve('echoed');
    });
    s.once('close', () => resolve(got >= 4096 ? 'echoed' : 'closed'));
    s.write(Buffer.alloc(4096, 7));
  });
}

/** A worker whose rpc-server (ready at `rpcPort`) serves `host` for `planId`: the context the tunnels follow. */
function workerContext(self: EndpointId, host: EndpointId, planId: string, rpcPort: number): NodeContext {
  return { self: { id: self }, running: null, links: [], rpc: 'ready', rpcPort, rpcTunnelPolicy: { host, planId }, quarantined: [] } as unknown as NodeContext;
}

async function meshOfTwo(make: () => Promise<MeshEndpoint>, dataPath: 'quic' | 'auto') {
  const hostEp = await make();
  const workerEp = await make();
  cleanups.push(() => hostEp.close(), () => workerEp.close());
  const logs: Record<string, unknown>[] = [];
  const workerLog = pino({ level: 'debug' }, { write: (l: string) => void logs.push(JSON.parse(l) as Record<string, unknown>) });
  const silent = pino({ level: 'silent' });
  const init = { dataPath, dataHost: '127.0.0.1', dataPort: 0 } as const;
  const host = new NodeTunnels(init, { endpoint: hostEp, log: silent, advertise: () => ['127.0.0.1'] });
  const worker = new NodeTunnels(init, { endpoint: workerEp, log: workerLog, advertise: () => ['127.0.0.1'] });
  cleanups.push(() => host.close(), () => worker.close());
  await host.listenData();
  await worker.listenData();
  const target = await countingEcho(); // stands in for the worker's rpc-server
  cleanups.push(() => target.close());
  worker.follow(workerContext(workerEp.id as EndpointId, hostEp.id as EndpointId, 'plan-B', target.port));
  await hostEp.dial(workerEp.id, workerEp.addrs());
  const refusals = (msg: string) => logs.filter((l) => l['msg'] === msg).map((l) => String(l['reason']));
  return { host, worker, hostId: hostEp.id as EndpointId, workerId: workerEp.id as EndpointId, target, refusals };
}

for (const backend of backends) {
  describe(`rpc tunnels carry the plan id (${backend.name})`, () => {
    it('QUIC: the host reaches the rpc-server for the plan the worker serves; a stream for another plan is refused and logged', async () => {
      const m = await meshOfTwo(backend.make, 'quic');
      expect(await within(tryEcho(await m.host.rpcAddressFor(m.workerId, 'plan-B')), 10_000, 'plan-B echo')).toBe('echoed');
      expect(m.target.connections()).toBe(1);
      expect(m.host.stats().connections).toMatchObject([{ kind: 'rpc', path: 'quic' }]);

      // Another plan (the host's llama-server of an older plan, say): its own listener, refused by the worker.
      const other = await m.host.rpcAddressFor(m.workerId, 'plan-A');
      expect(other).not.toBe(await m.host.rpcAddressFor(m.workerId, 'plan-B'));
      expect(await within(tryEcho(other), 10_000, 'plan-A refusal')).toBe('closed');
      expect(m.target.connections()).toBe(1);
      expect(m.refusals('refused a tunnel')).toEqual([expect.stringMatching(/plan plan-A, but this node's rpc-server serves plan plan-B/)]);
    }, 30_000);

    it('direct path: the offer carries the plan id, another plan is refused there (and then on QUIC), and tickets are bound to the plan', async () => {
      const m = await meshOfTwo(backend.make, 'auto');
      expect(await within(tryEcho(await m.host.rpcAddressFor(m.workerId, 'plan-B')), 10_000, 'plan-B echo')).toBe('echoed');
      expect(m.worker.stats().connections).toMatchObject([{ kind: 'rpc', side: 'accepted', path: 'direct' }]);

      // The tickets llama-server dials with itself (patch 0003): one for the plan the worker serves, none for another.
      expect(await m.host.directRpcFor(m.workerId, 'plan-A')).toBeNull();
      await within(until(() => m.refusals('refused a direct offer').length === 1), 5_000, 'the refusal is logged');
      expect(m.refusals('refused a direct offer')).toEqual([expect.stringMatching(/plan plan-A, but this node's rpc-server serves plan plan-B/)]);
      const ticket = await m.host.directRpcFor(m.workerId, 'plan-B');
      expect(ticket?.keyLine).toMatch(/^127\.0\.0\.1:\d+ [0-9a-f]{32} [0-9a-f]{64}$/);

      // A connection for another plan: its offer is refused, then its QUIC stream.
      expect(await within(tryEcho(await m.host.rpcAddressFor(m.workerId, 'plan-A')), 10_000, 'plan-A refusal')).toBe('closed');
      expect(m.target.connections()).toBe(1);
      await within(until(() => m.refusals('refused a direct offer').length === 2), 5_000, 'the refusal is logged');
      expect(m.refusals('refused a direct offer')[1]).toMatch(/plan plan-A/);
      expect(m.refusals('refused a tunnel')).toEqual([expect.stringMatching(/plan plan-A/)]);
    }, 30_000);
  });
}
