// The gossip view: a merge that is a join (commutative, associative, idempotent), and the connected part.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compareAnnouncements, connectedPart, emptyView, mergeAnnouncements, setSelf } from '../src/machines/gossip.ts';
import { asEndpointId, type Announcement, type View } from '../src/machines/mesh-types.ts';
import { announcementArb, nodeIds } from './support/election-properties.ts';

const ids = nodeIds(4);
const annArb = fc.constantFrom(...ids).chain((id) => announcementArb(id, ids, 10e9));
const batchArb = fc.array(annArb, { maxLength: 8 });
const selfAnn = (connectedTo: string[] = []): Announcement => ({
  id: asEndpointId('n0'),
  epoch: 0,
  seq: 0,
  name: 'n0',
  role: 'auto',
  vramBytes: 0,
  model: null,
  version: 1,
  serving: false,
  addrs: [],
  connectedTo: connectedTo.map(asEndpointId),
});
const base = emptyView(selfAnn());
const merge = (view: View, batch: readonly Announcement[]) => mergeAnnouncements(view, batch).view;
// Views are equal when they hold the same announcement per id (key order is arrival order and does not count).
const canon = (v: View) => JSON.stringify(Object.keys(v.announcements).sort().map((k) => v.announcements[k]));

describe('mergeAnnouncements is a join', () => {
  it('commutes', () => {
    const commutes = fc.property(batchArb, batchArb, (a, b) => {
      expect(canon(merge(merge(base, a), b))).toBe(canon(merge(merge(base, b), a)));
    });
    fc.assert(commutes, { numRuns: 500 });
  });

  it('associates (batching does not matter)', () => {
    const associates = fc.property(batchArb, batchArb, batchArb, (a, b, c) => {
      expect(canon(merge(merge(merge(base, a), b), c))).toBe(canon(merge(base, [...a, ...b, ...c])));
    });
    fc.assert(associates, { numRuns: 500 });
  });

  it('is idempotent, and says so: a repeat reports no change and returns the same view', () => {
    const idempotent = fc.property(batchArb, (a) => {
      const once = merge(base, a);
      const again = mergeAnnouncements(once, a);
      expect(again.changed).toBe(false);
      expect(again.view).toBe(once);
    });
    fc.assert(idempotent, { numRuns: 500 });
  });

  it('keeps the greatest (epoch, seq); a new epoch wins over any seq of the old one', () => {
    const old = { ...selfAnn(), id: asEndpointId('n1'), epoch: 1, seq: 9, vramBytes: 1 };
    const fresh = { ...old, epoch: 2, seq: 0, vramBytes: 2 };
    expect(merge(merge(base, [fresh]), [old]).announcements['n1']).toEqual(fresh);
    expect(merge(merge(base, [old]), [fresh]).announcements['n1']).toEqual(fresh);
    expect(compareAnnouncements(old, fresh)).toBe(-1);
  });
  it('breaks exact (epoch, seq) ties by content, never by arrival', () => {
    const a = { ...selfAnn(), id: asEndpointId('n1'), epoch: 1, seq: 1, vramBytes: 1 };
    const b = { ...a, vramBytes: 2 };
    expect(merge(merge(base, [a]), [b]).announcements['n1']).toEqual(merge(merge(base, [b]), [a]).announcements['n1']);
    expect(compareAnnouncements(a, { ...a })).toBe(0);
  });
});

describe('setSelf', () => {
  it('replaces the node\'s own announcement, and refuses another node\'s', () => {
    const next = { ...selfAnn(), seq: 1, vramBytes: 8 };
    expect(setSelf(base, next).announcements['n0']).toEqual(next);
    expect(() => setSelf(base, { ...next, id: asEndpointId('n9') })).toThrow(TypeError);
  });
});

describe('connectedPart', () => {
  const node = (id: string, links: string[]): Announcement => ({ ...selfAnn(links), id: asEndpointId(id), name: id });
  it('follows mutual edges only, sorted by id, through several hops', () => {
    const view = merge(emptyView(node('n0', ['n2'])), [node('n2', ['n0', 'n1']), node('n1', ['n2']), node('n3', ['n0'])]);
    expect(connectedPart(view).map((a) => a.id)).toEqual(['n0', 'n1', 'n2']); // n3's claim is one-sided
  });
  it('drops a dead node once its neighbours stop listing it, though its own last word still lists them', () => {
    let view = merge(emptyView(node('n0', ['n1'])), [node('n1', ['n0'])]);
    expect(connectedPart(view)).toHaveLength(2);
    view = setSelf(view, { ...node('n0', []), seq: 1 });
    expect(connectedPart(view).map((a) => a.id)).toEqual(['n0']);
  });
  it('gives each side of a partition its own part', () => {
    const all = [node('n0', ['n1']), node('n1', ['n0']), node('n2', ['n3']), node('n3', ['n2'])];
    const fromN3 = merge({ self: asEndpointId('n3'), announcements: {} }, all);
    expect(connectedPart(fromN3).map((a) => a.id)).toEqual(['n2', 'n3']);
    expect(connectedPart(merge(emptyView(all[0] as Announcement), all)).map((a) => a.id)).toEqual(['n0', 'n1']);
  });
  it('is empty for a view without its own announcement', () => {
    expect(connectedPart({ self: asEndpointId('x'), announcements: {} })).toEqual([]);
  });
});
