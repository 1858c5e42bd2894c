// Issue 10, item 7: a member forging another node's announcement changes no plan. Three real node machines
// (the churn simulator's world: in-memory network, fake processes, one clock) with real ed25519 keys and the
// product's signer; the member M sends, over its own connections, announcements of the host A that make A a
// lite client (with a huge epoch, so that they would win forever). With the product's verifier nothing
// changes; with verification switched off (an injected verifier that accepts anything) the same forgeries move
// the plan to another host, so this test can fail.
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MODEL, SimWorld, type NodeSpec } from '../model-tests/sim/world.ts';
import { announcementAuthority, ed25519PrivateKey, endpointIdOf, signAnnouncement } from '../src/io/wire/announcement-signature.ts';
import { createMeshId } from '../src/io/wire/invite-token.ts';
import type { Announcement, AnnouncementAuthority, EndpointId, Plan } from '../src/machines/mesh-types.ts';

type Forgery = 'signed by the forger' | 'tampered' | 'unsigned';

function run(forgery: Forgery, verification: 'on' | 'off'): { before: Record<string, string>; after: Record<string, string> } {
  const meshId = createMeshId();
  const keys = new Map<EndpointId, Uint8Array>();
  const spec = (vramGb: number): NodeSpec => {
    const key = new Uint8Array(randomBytes(32));
    const id = endpointIdOf(key);
    keys.set(id, key);
    return { id, role: 'auto', vramBytes: vramGb * 1e9, model: MODEL };
  };
  const [a, b, m] = [spec(16), spec(12), spec(11)];
  const factsFor = (id: EndpointId): AnnouncementAuthority => {
    const real = announcementAuthority(keys.get(id)!, meshId);
    return verification === 'on' ? real : { sign: real.sign, verify: () => true };
  };
  const world = new SimWorld(1, { factsFor });
  world.start(a, []);
  world.sched.runUntil(world.sched.now() + 200);
  world.start(b, [a.id]);
  world.start(m, [a.id]);
  world.sched.runUntil(world.sched.now() + 10_000);
  const hosts = (): Record<string, string> => {
    const out: Record<string, string> = {};
    for (const [name, s] of [['a', a], ['b', b], ['m', m]] as const) {
      const plan = world.nodes.get(s.id)!.actor.getSnapshot().context.plan as Plan | null;
      out[name] = plan?.kind === 'ready' ? (plan.host === a.id ? 'a' : plan.host === b.id ? 'b' : plan.host === m.id ? 'm' : '?') : String(plan?.kind);
    }
    return out;
  };
  const before = hosts();

  // What A really announces now, and what M makes of it: A as a lite client, in an epoch A will never reach.
  const real = world.nodes.get(a.id)!.actor.getSnapshot().context.self;
  const lie: Announcement = { ...real, role: 'client', model: null, vramBytes: 0, epoch: Number.MAX_SAFE_INTEGER, seq: 0 };
  const forged: Announcement =
    forgery === 'signed by the forger'
      ? signAnnouncement(ed25519PrivateKey(keys.get(m.id)!), meshId, lie)
      : forgery === 'tampered'
        ? { ...lie, sig: real.sig! }
        : (({ sig: _, ...unsigned }) => unsigned)(lie);
  for (const to of [a.id, b.id]) world.net.command(m.id, { type: 'net.send', to, message: { type: 'gossip', announcements: [forged] } });
  world.sched.runUntil(world.sched.now() + 5_000);
  const after = hosts();
  for (const n of world.nodes.values()) n.actor.stop();
  return { before, after };
}

describe('a member forging another node’s announcement', () => {
  for (const forgery of ['signed by the forger', 'tampered', 'unsigned'] as const) {
    it(`changes no plan (${forgery})`, () => {
      const { before, after } = run(forgery, 'on');
      expect(before).toEqual({ a: 'a', b: 'a', m: 'a' });
      expect(after).toEqual(before);
    });

    it(`does change the plan when verification is switched off (${forgery}): the test can fail`, () => {
      const { before, after } = run(forgery, 'off');
      expect(before).toEqual({ a: 'a', b: 'a', m: 'a' });
      // B believes A is a client now and elects another host; A knows better about itself.
      expect(after.b).not.toBe('a');
    });
  }
});
