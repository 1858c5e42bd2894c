// The election's properties, written as functions of an implementation (merge + elect), so the same
// property runs on the product and on planted-bug mutants that it must catch.
import fc from 'fast-check';
import { elect, readyPlanId } from '../../src/machines/election.ts';
import { emptyView, mergeAnnouncements } from '../../src/machines/gossip.ts';
import type { KvSizing } from '../../src/machines/kv-cache.ts';
import { asEndpointId, type Announcement, type EndpointId, type ModelIdentity, type Plan, type RolePreference, type View } from '../../src/machines/mesh-types.ts';

export interface ElectionImpl {
  readonly name: string;
  readonly merge: (view: View, incoming: readonly Announcement[]) => { view: View; changed: boolean };
  readonly elect: (view: View) => Plan;
}

export const product: ElectionImpl = { name: 'product', merge: mergeAnnouncements, elect };

const GB = 1e9;
export const MODEL_A: ModelIdentity = { name: 'model-a', bytes: 10 * GB, fingerprint: 'fp-a' };
export const MODEL_B: ModelIdentity = { name: 'model-b', bytes: 4 * GB, fingerprint: 'fp-b' };

// ---------------------------------------------------------------------------------------------
// Facts: small worlds where ties (equal VRAM, equal (epoch, seq) with different content) are common.

export const nodeIds = (n: number): EndpointId[] => Array.from({ length: n }, (_, i) => asEndpointId(`n${i}`));

const roleArb: fc.Arbitrary<RolePreference> = fc.oneof(
  { arbitrary: fc.constant('auto' as const), weight: 5 },
  { arbitrary: fc.constant('host' as const), weight: 2 },
  { arbitrary: fc.constant('worker' as const), weight: 2 },
  { arbitrary: fc.constant('client' as const), weight: 1 },
);
const vramArb = fc.constantFrom(0, 2, 4, 6, 8, 8, 12, 16).map((g) => g * GB);
/** The KV sizing a node announces (what the plans it hosts need besides 1.1 x the model), often absent. */
const kvArb: fc.Arbitrary<KvSizing | undefined> = fc.oneof(
  { arbitrary: fc.constant(undefined), weight: 2 },
  { arbitrary: fc.constantFrom(0, 0.5, 1, 3, 6).map((g): KvSizing => ({ ctxSize: 4096, parallel: 1, cacheType: 'f16', flashAttn: 'off', layers: 32, bytes: g * GB })), weight: 3 },
);
const modelArb = (bytes: number): fc.Arbitrary<ModelIdentity | null> =>
  fc.oneof(
    { arbitrary: fc.constant({ ...MODEL_A, bytes }), weight: 8 },
    { arbitrary: fc.constant(MODEL_B), weight: 1 },
    { arbitrary: fc.constant(null), weight: 1 },
  );

/** One version of one node's announcement: epoch and seq from tiny ranges, so exact ties happen. */
export function announcementArb(id: EndpointId, all: readonly EndpointId[], modelBytes: number): fc.Arbitrary<Announcement> {
  const others = all.filter((x) => x !== id);
  return fc.record({
    id: fc.constant(id),
    epoch: fc.nat(1),
    seq: fc.nat(3),
    name: fc.constant(`box-${id}`),
    role: roleArb,
    vramBytes: vramArb,
    model: modelArb(modelBytes),
    version: fc.oneof({ arbitrary: fc.constant(1), weight: 9 }, { arbitrary: fc.constant(2), weight: 1 }),
    serving: fc.boolean(),
    addrs: fc.constant([`10.0.0.${id.slice(1)}:4433`]),
    // Dense connectivity (most links present), so multi-node plans are common.
    connectedTo: fc.subarray(others, { minLength: Math.min(others.length, 1) }).map((xs) => [...xs].sort()),
    kv: kvArb,
  }).map(({ kv, ...a }) => (kv === undefined ? a : { ...a, kv }));
}

export interface Facts {
  readonly self: Announcement;
  /** Every gossiped announcement (several versions per node, the self node included). */
  readonly announcements: readonly Announcement[];
}

export const factsArb: fc.Arbitrary<Facts> = fc
  .record({ n: fc.integer({ min: 1, max: 6 }), modelGb: fc.constantFrom(3, 7, 10, 20, 40) })
  .chain(({ n, modelGb }) => {
    const ids = nodeIds(n);
    const versions = ids.map((id) => fc.array(announcementArb(id, ids, modelGb * GB), { minLength: 1, maxLength: 3 }));
    return fc.tuple(...versions).map((perNode) => {
      const flat = perNode.flat();
      return { self: flat[0] as Announcement, announcements: flat.slice(1) };
    });
  });

/** The view of the self node after merging `order` (indices into the facts) in batches cut at `cuts`. */
export function viewFrom(impl: ElectionImpl, facts: Facts, order: readonly number[], cuts: readonly number[] = []): View {
  const seq = order.map((i) => facts.announcements[i] as Announcement);
  let view = emptyView(facts.self);
  let from = 0;
  for (const cut of [...new Set(cuts.map((c) => c % (seq.length + 1)))].sort((a, b) => a - b).concat(seq.length)) {
    view = impl.merge(view, seq.slice(from, cut)).view;
    from = cut;
  }
  return view;
}

/** Every fact at least once, plus duplicates, in an arbitrary order. */
const deliveryArb = (n: number): fc.Arbitrary<number[]> =>
  n === 0
    ? fc.constant([])
    : fc
        .tuple(fc.array(fc.nat(n - 1), { maxLength: n }), fc.array(fc.nat(), { minLength: 2 * n, maxLength: 2 * n }))
        .map(([dups, keys]) => {
          const all = [...Array.from({ length: n }, (_, i) => i), ...dups];
          return all
            .map((v, i) => ({ v, k: keys[i % keys.length] as number }))
            .sort((a, b) => a.k - b.k)
            .map((x) => x.v);
        });

// ---------------------------------------------------------------------------------------------
// (a) the same facts in any order, with duplicates and in any batches, give the same plan.

export function sameFactsSamePlan(impl: ElectionImpl) {
  const arb = factsArb.chain((facts) =>
    fc.record({
      facts: fc.constant(facts),
      one: deliveryArb(facts.announcements.length),
      two: deliveryArb(facts.announcements.length),
      cutsOne: fc.array(fc.nat(), { maxLength: 3 }),
      cutsTwo: fc.array(fc.nat(), { maxLength: 3 }),
    }),
  );
  return fc.property(arb, ({ facts, one, two, cutsOne, cutsTwo }) => {
    const a = impl.elect(viewFrom(impl, facts, one, cutsOne));
    const b = impl.elect(viewFrom(impl, facts, two, cutsTwo));
    if (JSON.stringify(a) !== JSON.stringify(b)) {
      throw new Error(`same facts, different plans:\n${JSON.stringify(a)}\n${JSON.stringify(b)}`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// (b) every plan is valid, checked against the rules directly (not by calling the election's helpers).

/** Nodes reachable from self over mutual edges: an independent re-statement for the checks. */
export function reachable(view: View): Set<string> {
  const seen = new Set<string>([view.self]);
  const stack = [view.self as string];
  while (stack.length > 0) {
    const a = view.announcements[stack.pop() as string];
    for (const b of a?.connectedTo ?? []) {
      if (!seen.has(b) && view.announcements[b]?.connectedTo.includes(a?.id as EndpointId)) {
        seen.add(b);
        stack.push(b);
      }
    }
  }
  return seen;
}

/** Returns what is wrong with `plan` for `view`, or null when it is valid. */
export function planProblem(view: View, plan: Plan): string | null {
  if (typeof plan.id !== 'string' || plan.id.length === 0) return 'plan has no id';
  if (plan.kind === 'waiting') return plan.reason.trim().length > 0 ? null : 'waiting without a reason';
  const part = reachable(view);
  const self = view.announcements[view.self] as Announcement;
  const stageNodes = plan.stages.map((s) => view.announcements[s.id]);
  const host = view.announcements[plan.host];
  if (host === undefined || !part.has(host.id)) return 'host is not in the connected part';
  if (host.role === 'client' || host.role === 'worker') return `host has role ${host.role}`;
  if (host.model?.fingerprint !== plan.model.fingerprint) return 'host does not hold the plan model';
  if (self.role !== 'client' && self.model !== null && self.model.fingerprint !== plan.model.fingerprint) {
    return 'a node holding a model planned for another model';
  }
  if (plan.stages[plan.stages.length - 1]?.id !== plan.host) return 'host stage is not last';
  if (new Set(plan.stages.map((s) => s.id)).size !== plan.stages.length) return 'a node has two stages';
  for (const [i, a] of stageNodes.entries()) {
    if (a === undefined || !part.has(a.id)) return `stage ${i} is not in the connected part`;
    if (a.role === 'client' || a.model?.fingerprint !== plan.model.fingerprint) return `stage ${i} is not a candidate`;
    if (a.version !== self.version) return `stage ${i} runs another protocol version`;
    if (a.id !== host.id && !(a.connectedTo.includes(host.id) && host.connectedTo.includes(a.id))) {
      return `worker ${a.id} is not directly connected to the host`;
    }
  }
  const sum = plan.stages.reduce((n, s) => n + s.share, 0);
  if (Math.abs(sum - 1) > 1e-9) return `shares sum to ${sum}`;
  if (plan.stages.some((s) => !(s.share >= 0))) return 'a negative share';
  const vram = stageNodes.map((a) => a?.vramBytes ?? 0);
  const total = vram.reduce((n, v) => n + v, 0);
  // 1.1 x in integers (exactly 1.1 x counts as enough), plus the KV cache of the host's announced settings.
  const need = Math.ceil((plan.model.bytes * 11) / 10) + (host.kv?.bytes ?? 0);
  if (total < need) return `the set holds ${total} bytes, needs ${need}`;
  // Only as many nodes as needed: without its smallest worker the set must fall short.
  if (plan.stages.length > 1 && total - Math.min(...vram.slice(0, -1)) >= need) return 'more workers than needed';
  for (const [i, s] of plan.stages.entries()) {
    if (Math.abs(s.share - (vram[i] as number) / total) > 1e-9) return `stage ${i} share is not proportional to its VRAM`;
  }
  return null;
}

export function everyPlanValid(impl: ElectionImpl) {
  const arb = factsArb.chain((facts) =>
    fc.record({ facts: fc.constant(facts), order: deliveryArb(facts.announcements.length) }),
  );
  return fc.property(arb, ({ facts, order }) => {
    const view = viewFrom(impl, facts, order);
    const plan = impl.elect(view);
    const problem = planProblem(view, plan);
    if (problem !== null) throw new Error(`${problem}: ${JSON.stringify(plan)}`);
  });
}

// ---------------------------------------------------------------------------------------------
// (d) a change that cannot change the plan gives the identical plan (and the identical id).

type NeutralChange = 'lite-client-joins' | 'seq-bump' | 'serving-flips' | 'addrs-change';

/** Applies a change that must not alter the plan to node `who` (by index) of the view. */
export function neutralChange(view: View, change: NeutralChange, who: number): Announcement[] {
  const nodes = Object.values(view.announcements);
  const a = nodes[who % nodes.length] as Announcement;
  const bump = (x: Announcement, patch: Partial<Announcement>): Announcement => ({ ...x, ...patch, seq: x.seq + 1 });
  switch (change) {
    case 'seq-bump':
      return [bump(a, {})];
    case 'serving-flips':
      return [bump(a, { serving: !a.serving })];
    case 'addrs-change':
      return [bump(a, { addrs: [...a.addrs, '192.168.1.99:4433'] })];
    case 'lite-client-joins': {
      const client: Announcement = {
        id: asEndpointId('zz-client'),
        epoch: 0,
        seq: 0,
        name: 'laptop',
        role: 'client',
        vramBytes: 0,
        model: null,
        version: a.version,
        serving: false,
        addrs: [],
        connectedTo: [a.id],
      };
      return [client, bump(a, { connectedTo: [...a.connectedTo, client.id].sort() })];
    }
  }
}

export function neutralChangeKeepsPlan(impl: ElectionImpl) {
  const arb = factsArb.chain((facts) =>
    fc.record({
      facts: fc.constant(facts),
      order: deliveryArb(facts.announcements.length),
      change: fc.constantFrom<NeutralChange>('lite-client-joins', 'seq-bump', 'serving-flips', 'addrs-change'),
      who: fc.nat(),
    }),
  );
  return fc.property(arb, ({ facts, order, change, who }) => {
    const before = viewFrom(impl, facts, order);
    const after = impl.merge(before, neutralChange(before, change, who)).view;
    const a = impl.elect(before);
    const b = impl.elect(after);
    if (a.id !== b.id || JSON.stringify(a) !== JSON.stringify(b)) {
      throw new Error(`${change} changed the plan:\n${JSON.stringify(a)}\n${JSON.stringify(b)}`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Planted bugs. Each is a plausible mistake; the properties above must catch every one.

// The planted merges report `changed` only when content really changed, as a careful author would, so
// that they fail by disagreeing, not merely by gossiping forever.
const same = (a: Announcement | undefined, b: Announcement) => a !== undefined && JSON.stringify(a) === JSON.stringify(b);

/** A merge that keeps whatever arrived last: order decides, (epoch, seq) does not. */
export const lastWriterWinsMerge: ElectionImpl['merge'] = (view, incoming) => {
  const announcements = { ...view.announcements };
  let changed = false;
  for (const a of incoming) {
    if (same(announcements[a.id], a)) continue;
    announcements[a.id] = a;
    changed = true;
  }
  return { view: { self: view.self, announcements }, changed };
};

/** Orders by (epoch, seq) correctly, but an exact tie keeps the newcomer: arrival order breaks ties. */
export const arrivalTieMerge: ElectionImpl['merge'] = (view, incoming) => {
  const announcements = { ...view.announcements };
  let changed = false;
  for (const a of incoming) {
    const cur = announcements[a.id];
    if (same(cur, a)) continue;
    if (cur === undefined || a.epoch > cur.epoch || (a.epoch === cur.epoch && a.seq >= cur.seq)) {
      announcements[a.id] = a;
      changed = true;
    }
  }
  return { view: { self: view.self, announcements }, changed };
};

/** Compares seq only: an announcement from before a restart (new epoch, seq from 0) beats the fresh one. */
export const seqOnlyMerge: ElectionImpl['merge'] = (view, incoming) =>
  mergeAnnouncements(view, incoming.map((a) => ({ ...a, epoch: view.announcements[a.id]?.epoch ?? a.epoch })));

/**
 * Runs the real election on a view whose ids are renamed by `rank` (smaller ranks win id ties), then maps
 * the plan back to the real ids. This plants a tie-break other than the id without re-implementing elect.
 */
function electWithTieRank(view: View, rank: (a: Announcement, index: number) => string): Plan {
  const nodes = Object.values(view.announcements);
  const to = new Map<string, EndpointId>(nodes.map((a, i) => [a.id, asEndpointId(`${rank(a, i)}|${a.id}`)]));
  const back = new Map<string, EndpointId>(nodes.map((a) => [to.get(a.id) as string, a.id]));
  const rename = (id: EndpointId) => to.get(id) ?? id;
  const renamed: View = {
    self: rename(view.self),
    announcements: Object.fromEntries(
      nodes.map((a) => [rename(a.id), { ...a, id: rename(a.id), connectedTo: a.connectedTo.map(rename).sort() }]),
    ),
  };
  const plan = elect(renamed);
  if (plan.kind === 'waiting') return plan;
  const stages = plan.stages.map((s) => ({ id: back.get(s.id) as EndpointId, share: s.share }));
  const host = back.get(plan.host) as EndpointId;
  return { ...plan, host, stages, id: readyPlanId(plan.model.fingerprint, host, stages) };
}

/** VRAM ties go to whichever node the view heard of first. */
export const electTiesByArrival: ElectionImpl['elect'] = (view) =>
  electWithTieRank(view, (_a, i) => String(i).padStart(3, '0'));

/** VRAM ties go to the node itself: each node crowns itself, a private fact entering the election. */
export const electPreferringSelf: ElectionImpl['elect'] = (view) =>
  electWithTieRank(view, (a) => (a.id === view.self ? '0' : '1'));

/** VRAM ties go to nodes that are serving now: stickiness that makes a serving flip re-plan. */
export const electPreferringServing: ElectionImpl['elect'] = (view) =>
  electWithTieRank(view, (a) => (a.serving ? '0' : '1'));

/** The plan id hashes the whole view (seq included): every gossip would restart llama-server. */
export const electReplanningOnEveryChange: ElectionImpl['elect'] = (view) => {
  const plan = elect(view);
  const seqs = Object.values(view.announcements).map((a) => `${a.id}:${a.epoch}:${a.seq}`).sort().join(',');
  return { ...plan, id: `${plan.id}/${seqs}` };
};

/** The host's stage first instead of last. */
export const electHostFirst: ElectionImpl['elect'] = (view) => {
  const plan = elect(view);
  return plan.kind === 'ready' ? { ...plan, stages: [...plan.stages].reverse() } : plan;
};

/** Forgets the 1.1 x headroom: sets that hold just the model bytes. */
export const electWithoutHeadroom: ElectionImpl['elect'] = (view) => {
  const shrunk: View = {
    self: view.self,
    announcements: Object.fromEntries(
      Object.entries(view.announcements).map(([id, a]) => [
        id,
        a.model === null ? a : { ...a, model: { ...a.model, bytes: Math.floor(a.model.bytes / 1.1) } },
      ]),
    ),
  };
  const plan = elect(shrunk);
  return plan.kind === 'ready' ? { ...plan, model: view.announcements[plan.host]?.model ?? plan.model } : plan;
};

/** Forgets the KV cache: sizes plans by 1.1 x the model alone (the bug issue 13 fixed). */
export const electWithoutKvCache: ElectionImpl['elect'] = (view) =>
  elect({
    self: view.self,
    announcements: Object.fromEntries(Object.entries(view.announcements).map(([id, { kv: _, ...a }]) => [id, a])),
  });
