// Issue 10, item 7: "50 frames of 1000 validly self-signed fake ids leave memory and dialing bounded". A real
// node (test/harness/mesh-node.ts: buildNode, the real network actor, iroh on loopback) admits a hand-built
// member (a MeshNetwork in this process holding the mesh secret), which sends 50 gossip frames, each with
// 1000 announcements of fresh ed25519 keys, each validly signed by its own key. The node's view stays within
// VIEW_LIMITS.maxAnnouncements and its peer machines (whom it dials) within that bound too.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { MeshNetwork } from '../src/io/mesh/mesh-network.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { signAnnouncement } from '../src/io/wire/announcement-signature.ts';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { VIEW_LIMITS } from '../src/machines/gossip.ts';
import { asEndpointId, PROTOCOL_VERSION, type Announcement } from '../src/machines/mesh-types.ts';
import type { NetworkEvent } from '../src/machines/protocol.ts';
import { HarnessProc, until } from './harness/proc.ts';

interface StateLine {
  ev: 'state';
  links: string[];
  peers: Record<string, unknown>;
  view: number;
}

const procs: HarnessProc[] = [];
const cleanups: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const c of cleanups) await c();
  await Promise.all(procs.map((p) => p.stop()));
});

function fakeAnnouncements(meshId: string, n: number, frame: number): Announcement[] {
  const out: Announcement[] = [];
  for (let i = 0; i < n; i++) {
    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    const id = asEndpointId(Buffer.from(publicKey.export({ format: 'jwk' }).x!, 'base64url').toString('hex'));
    out.push(
      signAnnouncement(privateKey, meshId, {
        id,
        epoch: 1,
        seq: 0,
        name: `fake-${frame}-${i}`,
        role: 'auto',
        vramBytes: 80e9,
        model: null,
        version: PROTOCOL_VERSION,
        serving: false,
        addrs: [],
        connectedTo: [],
      }),
    );
  }
  return out;
}

describe('a gossip flood by an admitted member', () => {
  it('50 frames of 1000 validly self-signed fake ids leave the view and the dial set bounded', async () => {
    const node = new HarnessProc('./mesh-node.ts', { name: 'victim', logLevel: 'warn' });
    procs.push(node);
    const ready = await node.waitLine<{ id: string; addrs: string[]; token: string }>((l) => l.ev === 'ready', 30_000, 'node ready');
    const invite = decodeInviteToken(ready.token);

    const endpoint = await createIrohEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1', relay: 'none' });
    const events: NetworkEvent[] = [];
    const member = new MeshNetwork({ secret: invite.secret, hello: { role: 'auto', vramBytes: 0, model: null } }, { endpoint, logger: pino({ level: 'silent' }) });
    cleanups.push(async () => {
      await member.stop();
      await endpoint.close();
    });
    member.start((e) => events.push(e));
    member.execute({ type: 'net.dial', id: asEndpointId(ready.id), addrs: ready.addrs });
    await until(() => events.find((e) => e.type === 'net.peer.connected'), 30_000, 'the member admitted');

    const latest = (): StateLine | undefined => {
      for (let i = node.lines.length - 1; i >= 0; i--) if (node.lines[i]!.ev === 'state') return node.lines[i] as unknown as StateLine;
      return undefined;
    };
    let maxView = 0;
    let maxPeers = 0;
    const watch = setInterval(() => {
      const s = latest();
      if (s === undefined) return;
      maxView = Math.max(maxView, s.view);
      maxPeers = Math.max(maxPeers, Object.keys(s.peers).length);
    }, 20);
    try {
      for (let frame = 0; frame < 50; frame++) {
        const announcements = fakeAnnouncements(invite.meshId, 1000, frame);
        member.send(asEndpointId(ready.id), { type: 'gossip', announcements });
        await new Promise((r) => setTimeout(r, 20));
      }
      // The node took the flood in: its view is full (of fakes) and it is still up and linked to the member.
      await until(() => ((latest()?.view ?? 0) >= VIEW_LIMITS.maxAnnouncements ? true : undefined), 60_000, 'the view filled');
      await new Promise((r) => setTimeout(r, 2_000));
    } finally {
      clearInterval(watch);
    }
    const last = latest()!;
    expect(node.alive).toBe(true);
    expect(last.links).toContain(endpoint.id);
    expect(last.view).toBeLessThanOrEqual(VIEW_LIMITS.maxAnnouncements);
    expect(maxView).toBeLessThanOrEqual(VIEW_LIMITS.maxAnnouncements);
    // Peer machines: the member, the fakes still in the view (the node itself is not one).
    expect(maxPeers).toBeLessThanOrEqual(VIEW_LIMITS.maxAnnouncements);
    expect(node.logs.filter((l) => l.level >= 50)).toEqual([]);
  }, 300_000);
});
