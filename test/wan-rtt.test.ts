// The WAN lab with real nodes (test/support/wan-lab.ts): two nodes in network namespaces of their own, whose
// only route to each other is the link emulator's relays with a 20 ms round trip. Checks that every
// connection really crosses a relay, for QUIC (the connection's paths(), the UDP relay's counters) and for the
// direct data port (the tunnel's path, the TCP relay's counters), and that the round trip the nodes measure
// is at least the 20 ms made and well under 40. The exact figures go to bench/wan.bench.ts.
// Needs root (namespaces): it fails, with what is missing, where it cannot make them.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HarnessProc } from './harness/proc.ts';
import { hostServing, makeE2eModel, stopAllNodes, type E2eModel, type E2eNode } from './e2e-support.ts';
import { symmetricShape, type RelayCounters } from './support/link-emulator.ts';
import { createWanLab, startWanNode, type WanLab, type WanSite } from './support/wan-lab.ts';
import type { ConnectionPath } from '../src/io/transport/transport.ts';

const RTT_MS = 20;
let lab: WanLab;

beforeAll(async () => {
  lab = await createWanLab(2, symmetricShape(RTT_MS));
});
afterAll(async () => {
  await lab?.close();
});

/** A relay's address as a node sees it: a site's public address (a front we dial) or the root's veth end (a relay's upstream). */
function viaRelay(addr: string): boolean {
  const host = addr.replace(/:\d+$/, '');
  return lab.sites.some((s) => s.publicIp === host || s.vethIp.replace(/\.2$/, '.1') === host);
}

const crossed = (c: RelayCounters) => c.forward.deliveredBytes > 0 && c.backward.deliveredBytes > 0;

describe(`WAN lab: two nodes ${RTT_MS} ms apart`, () => {
  it('QUIC: the mesh connection runs only on relay paths (paths(), UDP relay counters); QUIC measures 20-40 ms', async () => {
    const [s1, s2] = lab.sites as [WanSite, WanSite];
    const config = (site: WanSite, name: string, token?: string) => ({ name, token, bindHost: '0.0.0.0', bindPort: site.port, logLevel: 'warn' });
    const a = new HarnessProc('./mesh-node.ts', config(s1, 'a'), s1.exec);
    const nodes = [a];
    try {
      const ready = await a.waitLine<{ id: string; token: string; addrs: string[] }>((l) => l['ev'] === 'ready', 30_000, 'a ready');
      // It announces its real addresses too: the veth one is among them, and must be of no use to the peer.
      expect(ready.addrs).toContain(`${s1.vethIp}:${s1.port}`);
      const joiner = new HarnessProc('./mesh-node.ts', config(s2, 'b', ready.token), s2.exec);
      nodes.push(joiner);
      const joined = await joiner.waitLine<{ id: string }>((l) => l['ev'] === 'ready', 30_000, 'b ready');
      const linked = (p: HarnessProc, other: string) => p.waitLine((l) => l['ev'] === 'state' && (l['links'] as string[]).includes(other), 30_000, 'a link');
      await linked(a, joined.id);
      await linked(joiner, ready.id);
      // QUIC's round-trip estimate settles over a few exchanges (heartbeats every second).
      await new Promise((r) => setTimeout(r, 3_000));
      for (const [p, other] of [[a, joined.id], [joiner, ready.id]] as const) {
        const before = p.lines.length;
        p.send({ cmd: 'paths' });
        const line = await p.waitLine<{ paths: Record<string, ConnectionPath[]> }>((l) => l['ev'] === 'paths' && p.lines.indexOf(l) >= before, 5_000, 'paths');
        const paths = line.paths[other] ?? [];
        expect(paths.length).toBeGreaterThan(0);
        for (const path of paths) expect(viaRelay(path.remoteAddr), `path ${path.remoteAddr} bypasses the relays`).toBe(true);
        const selected = paths.find((x) => x.selected)!;
        expect(selected.rttMs).toBeGreaterThanOrEqual(RTT_MS);
        expect(selected.rttMs).toBeLessThan(RTT_MS * 2);
      }
      expect(lab.counters().some((c) => crossed(c.quic))).toBe(true);
    } finally {
      await Promise.all(nodes.map((n) => n.stop()));
    }
  }, 90_000);

  describe('the direct data port', () => {
    let model: E2eModel;
    const nodes: E2eNode[] = [];
    beforeAll(async () => {
      model = await makeE2eModel();
    });
    afterAll(async () => {
      await stopAllNodes(nodes);
      await model?.remove();
    });

    it('a two-node plan runs its RPC over the direct TLS path through the TCP relay; RPC round trips take 20-40 ms', async () => {
      const start = (site: WanSite, name: string, vram: number, join?: string) => startWanNode(site, { name, model, vram, join, dir: model.dir });
      const [s1, s2] = lab.sites as [WanSite, WanSite];
      const first = await start(s1, 'n1', 0.6);
      nodes.push(first);
      nodes.push(await start(s2, 'n2', 0.7, first.token));
      const ready = await first.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.stages.length === 2, 120_000, 'a 2-stage plan');
      const hostId = ready.plan?.kind === 'ready' ? ready.plan.host : '';
      const host = nodes.find((n) => n.id === hostId)!;
      const worker = nodes.find((n) => n !== host)!;
      const workerSite = worker === first ? s1 : s2;
      const status = await host.waitStatus(hostServing, 180_000, 'the host serving');
      const completion = await host.client().completions.create({ model: 'mesh', prompt: 'Across the city', max_tokens: 8, temperature: 0 });
      expect(completion.choices[0]?.text.length).toBeGreaterThan(0);

      // The host's rpc connection to the worker took the direct path, and it went through the worker's TCP relay.
      expect(status.tunnels.connections.some((c) => c.kind === 'rpc' && c.side === 'opened' && c.path === 'direct')).toBe(true);
      expect(crossed(workerSite.dataRelay.counters())).toBe(true);

      // Commands the rpc-server answers without computing: their wait is the round trip through the whole path.
      const traffic = (await host.status()).rpcTraffic[worker.id];
      expect(traffic).toBeDefined();
      const waits = ['HELLO', 'GET_ALIGNMENT', 'GET_MAX_SIZE', 'GET_DEVICE_MEMORY', 'BUFFER_GET_BASE', 'DEVICE_COUNT']
        .map((name) => traffic!.commands[name])
        .filter((c) => c !== undefined && c.roundTrips > 0)
        .map((c) => c!.waitMs / c!.roundTrips);
      expect(waits.length).toBeGreaterThan(0);
      expect(Math.min(...waits)).toBeGreaterThanOrEqual(RTT_MS);
      expect(Math.min(...waits)).toBeLessThan(RTT_MS * 2);
    }, 300_000);
  });
});
