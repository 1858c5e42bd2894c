// acceptGossip (src/machines/gossip.ts): only facts signed by their owners enter a view, relaying keeps them
// valid, the view stays bounded, and facts nobody refreshes expire.
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { announcementAuthority, ed25519PrivateKey, endpointIdOf, signAnnouncement } from '../src/io/wire/announcement-signature.ts';
import { createMeshId } from '../src/io/wire/invite-token.ts';
import { acceptGossip, emptyFreshness, emptyView, expireStale, mergeAnnouncements, VIEW_LIMITS } from '../src/machines/gossip.ts';
import { asEndpointId, type Announcement, type View } from '../src/machines/mesh-types.ts';
import { announcementArb, nodeIds } from './support/election-properties.ts';
import { fakeFacts } from './support/fake-facts.ts';

const facts = fakeFacts();
const ids = nodeIds(4);
const self: Announcement = { ...facts.sign({ id: asEndpointId('self'), epoch: 1, seq: 0, name: 'self', role: 'auto', vramBytes: 0, model: null, version: 2, serving: false, addrs: [], connectedTo: [] }) };
const base = emptyView(self);
const canon = (v: View) => JSON.stringify(Object.keys(v.announcements).sort().map((k) => v.announcements[k]));

// An announcement either signed by its owner, or a forgery: tampered after signing, or never signed.
const gossipArb = fc
  .tuple(fc.constantFrom(...ids).chain((id) => announcementArb(id, ids, 10e9)), fc.constantFrom('signed', 'tampered', 'unsigned'))
  .map(([a, how]) => {
    const signed = facts.sign(a);
    if (how === 'signed') return { a: signed, valid: true };
    if (how === 'tampered') return { a: { ...signed, role: signed.role === 'client' ? ('auto' as const) : ('client' as const) }, valid: false };
    return { a, valid: false };
  });

describe('acceptGossip: signed facts only', () => {
  it('accepts exactly the validly signed announcements: the view equals the plain merge of the valid ones, in any order', () => {
    fc.assert(
      fc.property(fc.array(gossipArb, { maxLength: 12 }), fc.integer({ min: 1, max: 12 }), (batch, split) => {
        const all = batch.map((g) => g.a);
        const valid = batch.filter((g) => g.valid).map((g) => g.a);
        const once = acceptGossip(base, emptyFreshness(), all, { verify: facts.verify, now: 0 });
        expect(canon(once.view)).toBe(canon(mergeAnnouncements(base, valid).view));
        for (const a of Object.values(once.view.announcements)) expect(facts.verify(a)).toBe(true);
        // In two frames, reversed: the same view (the merge of signed facts is still a join).
        const first = acceptGossip(base, emptyFreshness(), [...all].reverse().slice(0, split), { verify: facts.verify, now: 0 });
        const second = acceptGossip(first.view, first.freshness, [...all].reverse().slice(split), { verify: facts.verify, now: 1 });
        expect(canon(second.view)).toBe(canon(once.view));
      }),
      { numRuns: 300 },
    );
  });

  it('a relayed view (what one node accepted, gossiped on verbatim) is accepted whole by the next node', () => {
    fc.assert(
      fc.property(fc.array(gossipArb, { maxLength: 12 }), (batch) => {
        const a = acceptGossip(base, emptyFreshness(), batch.map((g) => g.a), { verify: facts.verify, now: 0 });
        const relayed = Object.values(a.view.announcements).filter((x) => x.id !== self.id);
        const b = acceptGossip(emptyView({ ...self, id: asEndpointId('other') }), emptyFreshness(), relayed, { verify: facts.verify, now: 0 });
        expect(b.rejected).toBe(0);
        expect(Object.keys(b.view.announcements).length).toBe(relayed.length + 1);
      }),
      { numRuns: 200 },
    );
  });

  it('with real keys: a fact about X signed by the forger, or tampered, is rejected; X cannot be pushed to a huge epoch', () => {
    const meshId = createMeshId();
    const xKey = new Uint8Array(randomBytes(32));
    const forgerKey = new Uint8Array(randomBytes(32));
    const authority = announcementAuthority(new Uint8Array(randomBytes(32)), meshId);
    const x = announcementAuthority(xKey, meshId).sign({ ...self, id: endpointIdOf(xKey), name: 'x', vramBytes: 16e9 });
    const start = acceptGossip(base, emptyFreshness(), [x], { verify: authority.verify, now: 0 });
    expect(start.view.announcements[x.id]).toEqual(x);
    const forgeries = [
      signAnnouncement(ed25519PrivateKey(forgerKey), meshId, { ...x, role: 'client', epoch: Number.MAX_SAFE_INTEGER }),
      { ...x, role: 'client' as const, epoch: Number.MAX_SAFE_INTEGER },
      { ...x, seq: x.seq + 1, connectedTo: [] },
    ];
    const after = acceptGossip(start.view, start.freshness, forgeries, { verify: authority.verify, now: 1 });
    expect(after.rejected).toBe(3);
    expect(after.view).toBe(start.view);
    // Whereas without verification the forgery would have won, for good.
    const open = acceptGossip(start.view, start.freshness, forgeries, { verify: () => true, now: 1 });
    expect(open.view.announcements[x.id]!.epoch).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('never accepts a fact about self, signed or not', () => {
    const forged = facts.sign({ ...self, seq: 99, role: 'client' });
    expect(acceptGossip(base, emptyFreshness(), [forged], { verify: facts.verify, now: 0 }).view).toBe(base);
  });
});

describe('acceptGossip and expireStale: bounds and age', () => {
  const fake = (i: number, seq = 0): Announcement =>
    facts.sign({ ...self, id: asEndpointId(`fake${String(i).padStart(5, '0')}`), name: `f${i}`, seq });

  it('50 frames of 1000 self-signed ids keep the view within its bound, and protected ids stay', () => {
    const friend = fake(999_999);
    let state = acceptGossip(base, emptyFreshness(), [friend], { verify: facts.verify, now: 0 });
    for (let frame = 0; frame < 50; frame++) {
      const batch = Array.from({ length: 1000 }, (_, i) => fake(frame * 1000 + i));
      state = acceptGossip(state.view, state.freshness, batch, { verify: facts.verify, now: frame + 1, protect: (id) => id === friend.id });
      expect(Object.keys(state.view.announcements).length).toBeLessThanOrEqual(VIEW_LIMITS.maxAnnouncements);
      expect(Object.keys(state.freshness.heardAt).length).toBeLessThanOrEqual(VIEW_LIMITS.maxAnnouncements);
      expect(Object.keys(state.freshness.forgotten).length).toBeLessThanOrEqual(VIEW_LIMITS.maxForgotten);
      expect(state.view.announcements[self.id]).toBe(self);
      expect(state.view.announcements[friend.id]).toBe(friend);
    }
    // What it learned of the last frame never names an evicted id (so nothing evicted is dialed).
    expect(state.learned.every((a) => state.view.announcements[a.id] === a)).toBe(true);
  });

  it('an id not refreshed for the TTL expires; a refresh (newer seq) keeps it; an old copy cannot bring it back, a newer one can', () => {
    const a = fake(1);
    const b = fake(2);
    let s = acceptGossip(base, emptyFreshness(), [a, b], { verify: facts.verify, now: 0 });
    for (let t = 1; t < VIEW_LIMITS.ttlTicks; t++) {
      s = { ...s, ...expireStale(s.view, s.freshness, { now: t }) };
      expect(Object.keys(s.view.announcements)).toHaveLength(3);
    }
    // b refreshes (a new seq, same facts: `refreshed`, not `learned`), a does not.
    const r = acceptGossip(s.view, s.freshness, [fake(2, 1)], { verify: facts.verify, now: VIEW_LIMITS.ttlTicks - 1 });
    expect(r.refreshed.map((x) => x.id)).toEqual([b.id]);
    expect(r.learned).toEqual([]);
    const e = expireStale(r.view, r.freshness, { now: VIEW_LIMITS.ttlTicks });
    expect(e.expired).toEqual([a.id]);
    expect(Object.keys(e.view.announcements).sort()).toEqual([b.id, self.id].sort());
    // Protected ids (links, invites) never expire.
    expect(expireStale(r.view, r.freshness, { now: 100, protect: (id) => id === a.id }).expired).toEqual([b.id]);
    // A relayed old copy of a does not resurrect it; a newer announcement of a does.
    const stale = acceptGossip(e.view, e.freshness, [a], { verify: facts.verify, now: 7 });
    expect(stale.view.announcements[a.id]).toBeUndefined();
    const back = acceptGossip(e.view, e.freshness, [fake(1, 1)], { verify: facts.verify, now: 7 });
    expect(back.view.announcements[a.id]?.seq).toBe(1);
    expect(back.freshness.forgotten[a.id]).toBeUndefined();
  });
});
