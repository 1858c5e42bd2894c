// elect(view): the rules of ARCHITECTURE.md on examples, then properties (a), (b) and (d) on the product,
// each shown to bite on planted-bug mutants.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { elect, electionFingerprint, HEADROOM } from '../src/machines/election.ts';
import type { KvSizing } from '../src/machines/kv-cache.ts';
import { emptyView, mergeAnnouncements } from '../src/machines/gossip.ts';
import { asEndpointId, type Announcement, type ModelIdentity, type Plan, type RolePreference, type View } from '../src/machines/mesh-types.ts';
import {
  arrivalTieMerge,
  electHostFirst,
  electPreferringServing,
  electReplanningOnEveryChange,
  electTiesByArrival,
  electWithoutHeadroom,
  electWithoutKvCache,
  everyPlanValid,
  lastWriterWinsMerge,
  neutralChangeKeepsPlan,
  planProblem,
  product,
  sameFactsSamePlan,
  type ElectionImpl,
} from './support/election-properties.ts';

const GB = 1e9;
const MIB = 1024 ** 2;
const MODEL: ModelIdentity = { name: 'glm', bytes: 10 * GB, fingerprint: 'fp-glm' };
const OTHER: ModelIdentity = { name: 'qwen', bytes: 2 * GB, fingerprint: 'fp-qwen' };

interface NodeSpec {
  vram?: number;
  role?: RolePreference;
  model?: ModelIdentity | null;
  links?: string[];
  version?: number;
  seq?: number;
  serving?: boolean;
  kv?: KvSizing;
}
const ann = (id: string, s: NodeSpec = {}): Announcement => ({
  id: asEndpointId(id),
  epoch: 1,
  seq: s.seq ?? 1,
  name: id,
  role: s.role ?? 'auto',
  vramBytes: Math.round((s.vram ?? 0) * GB),
  model: s.model === undefined ? MODEL : s.model,
  version: s.version ?? 1,
  serving: s.serving ?? false,
  addrs: [],
  connectedTo: (s.links ?? []).map(asEndpointId).sort(),
  ...(s.kv === undefined ? {} : { kv: s.kv }),
});

/** A view from `self`'s side of a mesh given as node specs; links are made mutual unless `oneWay`. */
function mesh(self: string, nodes: Record<string, NodeSpec>, oneWay = false): View {
  const specs = Object.entries(nodes).map(([id, s]) => ({ id, s: { ...s, links: [...(s.links ?? [])] } }));
  if (!oneWay) {
    for (const { id, s } of specs) {
      for (const l of s.links) {
        const other = specs.find((x) => x.id === l);
        if (other !== undefined && !other.s.links.includes(id)) other.s.links.push(id);
      }
    }
  }
  const all = specs.map(({ id, s }) => ann(id, s));
  return mergeAnnouncements(emptyView(all.find((a) => a.id === self) as Announcement), all).view;
}

const ready = (plan: Plan) => {
  if (plan.kind !== 'ready') throw new Error(`expected a ready plan, got: ${plan.reason}`);
  return plan;
};

describe('elect: the rules', () => {
  it('runs solo when the model fits the host (>= 1.1 x model bytes)', () => {
    const plan = ready(elect(mesh('a', { a: { vram: 11 }, b: { vram: 24, links: ['a'] } })));
    expect(plan.host).toBe('b');
    expect(plan.stages).toEqual([{ id: 'b', share: 1 }]);
    expect(plan.model).toEqual(MODEL);
  });

  it('counts exactly 1.1 x the model as enough (no floating-point miss)', () => {
    const small: ModelIdentity = { name: 'tiny', bytes: 3 * GB, fingerprint: 'fp-tiny' };
    const view = mesh('a', { a: { vram: 3.3, model: small } });
    expect(ready(elect(view)).stages).toEqual([{ id: 'a', share: 1 }]);
    expect(elect(mesh('a', { a: { vram: 3.299, model: small } })).kind).toBe('waiting');
  });

  it('splits in proportion to VRAM, host last, with only as many workers as needed', () => {
    // need 11 GB: host c (8) + the biggest worker b (6) = 14 suffices; a (4) stays out.
    const plan = ready(elect(mesh('a', { a: { vram: 4, links: ['b', 'c'] }, b: { vram: 6, links: ['c'] }, c: { vram: 8 } })));
    expect(plan.host).toBe('c');
    expect(plan.stages.map((s) => s.id)).toEqual(['b', 'c']);
    expect(plan.stages[0]?.share).toBeCloseTo(6 / 14, 12);
    expect(plan.stages.reduce((n, s) => n + s.share, 0)).toBe(1);
  });

  it('prefers --role host over more VRAM, and never lets --role worker host', () => {
    const nodes = { a: { vram: 6, role: 'host' as const, links: ['b', 'c'] }, b: { vram: 24, role: 'worker' as const, links: ['c'] }, c: { vram: 12 } };
    const plan = ready(elect(mesh('c', nodes)));
    expect(plan.host).toBe('a');
    expect(plan.stages.map((s) => s.id)).toEqual(['b', 'a']);
    expect(ready(elect(mesh('c', { ...nodes, a: { ...nodes.a, role: 'auto' } }))).host).toBe('c');
  });

  it('breaks VRAM ties by id, for hosts and for workers', () => {
    const plan = ready(elect(mesh('d', { d: { vram: 4, links: ['a', 'b', 'c'] }, c: { vram: 4, links: ['a', 'b'] }, b: { vram: 4, links: ['a'] }, a: { vram: 4 } })));
    expect(plan.host).toBe('a');
    expect(plan.stages.map((s) => s.id)).toEqual(['b', 'c', 'a']);
  });

  it('leaves out lite clients, other models and other protocol versions', () => {
    const plan = ready(
      elect(
        mesh('a', {
          a: { vram: 8, links: ['b', 'c', 'd', 'e'] },
          b: { vram: 64, role: 'client', model: null },
          c: { vram: 64, model: OTHER },
          d: { vram: 64, version: 2 },
          e: { vram: 4 },
        }),
      ),
    );
    expect(plan.stages.map((s) => s.id)).toEqual(['e', 'a']);
  });

  it('takes workers only among nodes the host is mutually connected to', () => {
    // b (6 GB) reaches the host c only through a: with a (2) and c (8) the set falls short of 11 GB.
    const viaA = mesh('a', { a: { vram: 2, links: ['b', 'c'] }, b: { vram: 6 }, c: { vram: 8 } });
    expect(elect(viaA)).toMatchObject({ kind: 'waiting', reason: expect.stringContaining('the mesh has 9.3 GiB') });
    const direct = mesh('a', { a: { vram: 2, links: ['b', 'c'] }, b: { vram: 6, links: ['c'] }, c: { vram: 8 } });
    expect(ready(elect(direct)).stages.map((s) => s.id)).toEqual(['b', 'c']);
    // A one-sided claim is no connection: c never lists b.
    const oneSided = mesh('a', { a: { vram: 2, links: ['b', 'c'] }, b: { vram: 6, links: ['a', 'c'] }, c: { vram: 8, links: ['a'] } }, true);
    expect(elect(oneSided).kind).toBe('waiting');
  });

  it('waits with a reason in the unit that shows the number when the capacity is not there', () => {
    const plan = elect(mesh('a', { a: { vram: 4, links: ['b'] }, b: { vram: 4 } }));
    expect(plan.kind).toBe('waiting');
    if (plan.kind === 'waiting') expect(plan.reason).toMatch(/need 10\.2 GiB of VRAM for glm \(1\.1 x 9\.3 GiB\), the mesh has 7\.5 GiB/);
    // The demo's 45 MiB model read "need 0.1 GB ... (1.1 x 0.0 GB), the mesh has 0.0 GB".
    const demo: ModelIdentity = { name: 'demo', bytes: 45 * MIB, fingerprint: 'fp-demo' };
    const small = elect(mesh('a', { a: { vram: 20 * MIB / GB, model: demo } }));
    expect(small).toMatchObject({ kind: 'waiting', reason: 'need 50 MiB of VRAM for demo (1.1 x 45 MiB), the mesh has 20 MiB (host a and 0 directly connected worker(s))' });
  });

  it("counts the host's KV cache in what a plan must hold, by the host's announced settings", () => {
    const kv = (gb: number): KvSizing => ({ ctxSize: 32768, parallel: 2, cacheType: 'q8_0', flashAttn: 'on', layers: 40, bytes: Math.round(gb * GB) });
    // 11 GB holds 1.1 x 10 GB, but not with a 2 GB KV cache on top: the biggest worker joins.
    const nodes = { a: { vram: 11, links: ['b', 'c'], kv: kv(2) }, b: { vram: 2, links: ['c'] }, c: { vram: 1 } };
    expect(ready(elect(mesh('c', nodes))).stages.map((s) => s.id)).toEqual(['b', 'a']);
    expect(ready(elect(mesh('c', { ...nodes, a: { ...nodes.a, kv: kv(0) } }))).stages.map((s) => s.id)).toEqual(['a']);
    // Not enough even with every worker: the reason names the KV cache and its settings.
    const short = elect(mesh('b', { ...nodes, a: { ...nodes.a, kv: kv(5) } }));
    expect(short).toMatchObject({ kind: 'waiting', reason: expect.stringContaining('(1.1 x 9.3 GiB + 4.7 GiB KV cache: ctx 32768 x 2 slots, q8_0), the mesh has 13.0 GiB') });
    // The host's settings count, not the asking node's (every node computes the same plan).
    const fromB = mesh('b', { ...nodes, b: { ...nodes.b, kv: kv(0) } });
    expect(elect(fromB).id).toBe(elect(mesh('c', nodes)).id);
    // Nonsense KV numbers count nothing and never throw.
    expect(ready(elect(mesh('a', { a: { vram: 11, kv: { ...kv(0), bytes: Number.NaN } } }))).stages).toHaveLength(1);
  });

  it('waits when every model holder is --role worker, or nobody holds a model', () => {
    const workers = elect(mesh('a', { a: { vram: 64, role: 'worker', links: ['b'] }, b: { vram: 64, role: 'worker' } }));
    expect(workers).toMatchObject({ kind: 'waiting', reason: expect.stringContaining('--role worker') });
    const lonely = elect(mesh('a', { a: { role: 'client', model: null } }));
    expect(lonely).toMatchObject({ kind: 'waiting', reason: expect.stringContaining('no node in reach holds a model') });
  });

  it('elects per part: each side of a partition gets its own host', () => {
    const left = ready(elect(mesh('a', { a: { vram: 16, links: ['b'] }, b: { vram: 2 }, c: { vram: 32, links: ['d'] }, d: { vram: 2 } })));
    const right = ready(elect(mesh('d', { a: { vram: 16, links: ['b'] }, b: { vram: 2 }, c: { vram: 32, links: ['d'] }, d: { vram: 2 } })));
    expect([left.host, right.host]).toEqual(['a', 'c']);
  });

  it('a lite client follows the model most candidates hold (ties by fingerprint)', () => {
    const view = mesh('x', { x: { role: 'client', model: null, links: ['a', 'b', 'c'] }, a: { vram: 16 }, b: { vram: 4, model: OTHER }, c: { vram: 4, model: OTHER } });
    expect(electionFingerprint(view)).toBe('fp-qwen');
    expect(ready(elect(view)).model).toEqual(OTHER);
    const tie = mesh('x', { x: { role: 'client', model: null, links: ['a', 'b'] }, a: { vram: 16 }, b: { vram: 4, model: OTHER } });
    expect(electionFingerprint(tie)).toBe('fp-glm');
  });

  it('a node with a model elects over its own model, even in a minority', () => {
    const view = mesh('b', { a: { vram: 16, links: ['b', 'c'] }, b: { vram: 4, model: OTHER }, c: { vram: 16 } });
    expect(ready(elect(view)).model).toEqual(OTHER);
  });

  it('is total: nonsense numbers never throw, they just do not count', () => {
    const view = mesh('a', { a: { vram: 16, links: ['b', 'c'] }, b: {}, c: {} });
    const broken: View = {
      ...view,
      announcements: {
        ...view.announcements,
        b: { ...(view.announcements['b'] as Announcement), vramBytes: Number.NaN },
        c: { ...(view.announcements['c'] as Announcement), vramBytes: -5, model: { ...MODEL, bytes: Number.POSITIVE_INFINITY } },
      },
    };
    expect(ready(elect(broken)).stages.map((s) => s.id)).toEqual(['a']);
    expect(elect({ self: asEndpointId('ghost'), announcements: {} }).kind).toBe('waiting');
  });

  it('its id ignores seq, serving and addresses, and follows host, split and model', () => {
    const base = mesh('a', { a: { vram: 8, links: ['b'] }, b: { vram: 6 } });
    const same = mesh('a', { a: { vram: 8, links: ['b'], seq: 9, serving: true }, b: { vram: 6, seq: 4 } });
    expect(elect(same).id).toBe(elect(base).id);
    const resplit = mesh('a', { a: { vram: 8, links: ['b'] }, b: { vram: 7 } });
    expect(elect(resplit).id).not.toBe(elect(base).id);
    expect(planProblem(base, elect(base))).toBeNull();
    expect(HEADROOM).toBe(1.1);
  });
});

/** Asserts that fast-check finds a counterexample to `property` within `numRuns`. */
function bites(property: fc.IProperty<unknown>, numRuns: number): void {
  const result = fc.check(property, { numRuns, endOnFailure: true }); // no shrinking: finding one is the point
  expect(result.failed, `no counterexample in ${numRuns} runs`).toBe(true);
}

const mutant = (name: string, patch: Partial<ElectionImpl>): ElectionImpl => ({ ...product, ...patch, name });

describe('(a) the same facts in any order, with duplicates, give the same plan', () => {
  const property = sameFactsSamePlan as (impl: ElectionImpl) => fc.IProperty<unknown>;
  it('holds for the product', () => fc.assert(property(product), { numRuns: 600 }));
  it.each([
    mutant('merge where the last arrival wins', { merge: lastWriterWinsMerge }),
    mutant('merge breaking exact ties by arrival order', { merge: arrivalTieMerge }),
    mutant('election breaking VRAM ties by arrival order', { elect: electTiesByArrival }),
  ])('catches the planted bug: $name', (impl) => bites(property(impl), 1500));
});

describe('(b) every plan is valid, or says why it waits', () => {
  const property = everyPlanValid as (impl: ElectionImpl) => fc.IProperty<unknown>;
  it('holds for the product', () => fc.assert(property(product), { numRuns: 1000 }));
  it.each([
    mutant('host stage first', { elect: electHostFirst }),
    mutant('forgotten 1.1 x headroom', { elect: electWithoutHeadroom }),
    mutant("forgotten KV cache (1.1 x the model alone)", { elect: electWithoutKvCache }),
  ])('catches the planted bug: $name', (impl) => bites(property(impl), 500));
});

describe('(d) a change that cannot change the plan keeps the identical plan id', () => {
  const property = neutralChangeKeepsPlan as (impl: ElectionImpl) => fc.IProperty<unknown>;
  it('holds for the product', () => fc.assert(property(product), { numRuns: 1000 }));
  it.each([
    mutant('plan id over every announcement (re-plans on every change)', { elect: electReplanningOnEveryChange }),
    mutant('serving nodes win ties (a serving flip re-plans)', { elect: electPreferringServing }),
  ])('catches the planted bug: $name', (impl) => bites(property(impl), 3000));
});
