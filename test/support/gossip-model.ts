// A small gossip-exchange model for the convergence property: nodes that join, leave, crash, change role
// and VRAM, and link or unlink, exchanging full views over a message bag that delays, reorders and
// duplicates. Each node runs the merge and election under test; nothing here knows the election rules.
import fc from 'fast-check';
import { emptyView, setSelf } from '../../src/machines/gossip.ts';
import type { Announcement, EndpointId, Plan, RolePreference, View } from '../../src/machines/mesh-types.ts';
import { MODEL_A, nodeIds, type ElectionImpl } from './election-properties.ts';

const GB = 1e9;

export type Step =
  | { readonly kind: 'join'; readonly who: number; readonly links: readonly number[] }
  | { readonly kind: 'leave'; readonly who: number }
  | { readonly kind: 'crash'; readonly who: number }
  | { readonly kind: 'detect'; readonly who: number }
  | { readonly kind: 'role'; readonly who: number; readonly role: RolePreference }
  | { readonly kind: 'vram'; readonly who: number; readonly vramGb: number }
  | { readonly kind: 'link'; readonly a: number; readonly b: number; readonly up: boolean }
  | { readonly kind: 'deliver'; readonly pick: number; readonly duplicate: boolean };

export interface Scenario {
  readonly nodes: number;
  /** Which nodes are lite clients (no model); the others hold MODEL_A. */
  readonly clients: readonly boolean[];
  readonly vramGb: readonly number[];
  readonly modelGb: number;
  /** How many nodes form the mesh before the churn starts (a full mesh, as nodes connect to all they learn of). */
  readonly initial: number;
  readonly steps: readonly Step[];
  /** Picks for the final flush (used cyclically), so delivery order stays arbitrary to the end. */
  readonly flush: readonly number[];
}

const vramGbArb = fc.constantFrom(0, 4, 6, 8, 8, 12, 16);
const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant('join' as const), who: fc.nat(), links: fc.array(fc.nat(), { minLength: 1, maxLength: 3 }) }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant('leave' as const), who: fc.nat() }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('crash' as const), who: fc.nat() }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('detect' as const), who: fc.nat() }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('role' as const), who: fc.nat(), role: fc.constantFrom<RolePreference>('auto', 'host', 'worker') }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('vram' as const), who: fc.nat(), vramGb: vramGbArb }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('link' as const), a: fc.nat(), b: fc.nat(), up: fc.constantFrom(true, false, false) }), weight: 6 },
  { arbitrary: fc.record({ kind: fc.constant('deliver' as const), pick: fc.nat(), duplicate: fc.boolean() }), weight: 10 },
);

export const scenarioArb: fc.Arbitrary<Scenario> = fc.integer({ min: 2, max: 7 }).chain((nodes) =>
  fc.record({
    nodes: fc.constant(nodes),
    // About one node in four is a lite client; node 0, which starts the mesh, always holds the model.
    clients: fc
      .array(fc.oneof({ arbitrary: fc.constant(false), weight: 3 }, { arbitrary: fc.constant(true), weight: 1 }), { minLength: nodes, maxLength: nodes })
      .map((cs) => cs.map((c, i) => c && i !== 0)),
    vramGb: fc.array(vramGbArb, { minLength: nodes, maxLength: nodes }),
    modelGb: fc.constantFrom(3, 7, 10, 20),
    initial: fc.integer({ min: 1, max: nodes }),
    steps: fc.array(stepArb, { minLength: 5, maxLength: 60, size: 'max' }),
    flush: fc.array(fc.nat(), { minLength: 1, maxLength: 40 }),
  }),
);

interface SimNode {
  readonly id: EndpointId;
  readonly client: boolean;
  alive: boolean;
  epoch: number;
  seq: number;
  role: RolePreference;
  vramBytes: number;
  links: Set<EndpointId>;
  view: View;
}

interface Message {
  readonly to: EndpointId;
  readonly from: EndpointId;
  readonly announcements: readonly Announcement[];
}

export interface Outcome {
  /** The connected parts of alive nodes by their real links. */
  readonly parts: EndpointId[][];
  /** Each alive node's plan, by its own view. */
  readonly plans: ReadonlyMap<EndpointId, Plan>;
  /** Each alive node's plan over the true current facts (what it should converge to). */
  readonly expected: ReadonlyMap<EndpointId, Plan>;
  readonly deliveries: number;
  readonly settled: boolean;
}

/** Runs a scenario with `impl`; every alive node merges with impl.merge and elects with impl.elect. */
export function runScenario(impl: ElectionImpl, sc: Scenario, maxDeliveries = 20_000): Outcome {
  const ids = nodeIds(sc.nodes);
  const nodes = new Map<EndpointId, SimNode>();
  ids.forEach((id, i) => {
    const client = sc.clients[i] ?? false;
    const self: Announcement = announce({ id, client, epoch: 0, seq: 0, role: client ? 'client' : 'auto', vramBytes: (sc.vramGb[i] ?? 0) * GB, links: new Set() }, sc.modelGb);
    nodes.set(id, { id, client, alive: false, epoch: 0, seq: 0, role: self.role, vramBytes: self.vramBytes, links: new Set(), view: emptyView(self) });
  });
  const node = (i: number) => nodes.get(ids[i % ids.length] as EndpointId) as SimNode;
  const bag: Message[] = [];
  const crashed = new Set<EndpointId>();
  let deliveries = 0;
  let duplicates = 0;

  const broadcast = (n: SimNode) => {
    const announcements = Object.values(n.view.announcements);
    for (const to of n.links) bag.push({ to, from: n.id, announcements });
  };
  // The node is the only author of its own announcement: it raises seq and replaces it in its view.
  const changeSelf = (n: SimNode) => {
    n.seq += 1;
    n.view = setSelf(n.view, announce(n, sc.modelGb));
    broadcast(n);
  };
  const link = (a: SimNode, b: SimNode) => {
    if (a === b || !a.alive || !b.alive || a.links.has(b.id)) return;
    a.links.add(b.id);
    b.links.add(a.id);
    changeSelf(a);
    changeSelf(b);
  };
  const unlink = (a: SimNode, b: SimNode) => {
    if (!a.links.has(b.id)) return;
    a.links.delete(b.id);
    b.links.delete(a.id);
    if (a.alive) changeSelf(a);
    if (b.alive) changeSelf(b);
  };
  const deliver = (index: number, duplicate: boolean) => {
    if (bag.length === 0) return;
    const i = index % bag.length;
    const m = bag[i] as Message;
    // Duplication is bounded, so every schedule still drains.
    if (duplicate && duplicates < 200) duplicates += 1;
    else bag.splice(i, 1);
    deliveries += 1;
    const to = nodes.get(m.to) as SimNode;
    // A message on a connection that has since closed is lost with it.
    if (!to.alive || !to.links.has(m.from)) return;
    const merged = impl.merge(to.view, m.announcements);
    to.view = merged.view;
    if (merged.changed) broadcast(to);
  };
  const detect = (dead: SimNode) => {
    crashed.delete(dead.id);
    for (const other of [...dead.links]) unlink(dead, nodes.get(other) as SimNode);
  };
  const join = (n: SimNode, peers: readonly SimNode[]) => {
    if (n.alive || crashed.has(n.id)) return;
    n.alive = true;
    n.epoch += 1; // a fresh run: its announcements supersede everything from the last one
    n.seq = 0;
    n.view = emptyView(announce(n, sc.modelGb));
    for (const p of peers) link(n, p);
  };

  // Node 0 starts the mesh, the first few join it; the scenario does the rest.
  for (let i = 0; i < sc.initial; i++) join(node(i), [...nodes.values()].filter((n) => n.alive));
  for (const step of sc.steps) {
    switch (step.kind) {
      case 'join': {
        // It dials nodes that are up (as with an invite token from one of them).
        const alive = [...nodes.values()].filter((n) => n.alive);
        join(node(step.who), alive.length === 0 ? [] : step.links.map((l) => alive[l % alive.length] as SimNode));
        break;
      }
      case 'leave': {
        const n = node(step.who);
        if (!n.alive) break;
        n.alive = false; // a graceful leave: peers drop it at once
        for (const other of [...n.links]) unlink(n, nodes.get(other) as SimNode);
        break;
      }
      case 'crash': {
        const n = node(step.who);
        if (!n.alive) break;
        n.alive = false; // peers only notice when heartbeats time out (a later `detect`)
        crashed.add(n.id);
        break;
      }
      case 'detect': {
        const dead = [...crashed];
        if (dead.length > 0) detect(nodes.get(dead[step.who % dead.length] as EndpointId) as SimNode);
        break;
      }
      case 'role': {
        const n = node(step.who);
        if (n.alive && !n.client && n.role !== step.role) {
          n.role = step.role;
          changeSelf(n);
        }
        break;
      }
      case 'vram': {
        const n = node(step.who);
        if (n.alive && !n.client && n.vramBytes !== step.vramGb * GB) {
          n.vramBytes = step.vramGb * GB;
          changeSelf(n);
        }
        break;
      }
      case 'link': {
        const a = node(step.a);
        const b = node(step.b);
        if (step.up) link(a, b);
        else unlink(a, b);
        break;
      }
      case 'deliver':
        deliver(step.pick, step.duplicate);
        break;
    }
  }

  // Quiet down: every crash is detected, then every message in flight is delivered, in arbitrary order.
  for (const id of [...crashed]) detect(nodes.get(id) as SimNode);
  let k = 0;
  while (bag.length > 0 && deliveries < maxDeliveries) {
    const pick = sc.flush[k % sc.flush.length] as number;
    deliver(pick + k, k % 7 === 3);
    k += 1;
  }

  const alive = [...nodes.values()].filter((n) => n.alive);
  const truth = alive.map((n) => announce(n, sc.modelGb));
  const plans = new Map<EndpointId, Plan>();
  const expected = new Map<EndpointId, Plan>();
  for (const n of alive) {
    plans.set(n.id, impl.elect(n.view));
    const trueView: View = { self: n.id, announcements: Object.fromEntries(truth.map((a) => [a.id, a])) };
    expected.set(n.id, impl.elect(trueView));
  }
  return { parts: partsOf(alive), plans, expected, deliveries, settled: bag.length === 0 };
}

function announce(
  n: Pick<SimNode, 'id' | 'client' | 'epoch' | 'seq' | 'role' | 'vramBytes' | 'links'>,
  modelGb: number,
): Announcement {
  return {
    id: n.id,
    epoch: n.epoch,
    seq: n.seq,
    name: `box-${n.id}`,
    role: n.role,
    vramBytes: n.vramBytes,
    model: n.client ? null : { ...MODEL_A, bytes: modelGb * GB },
    version: 1,
    serving: false,
    addrs: [],
    connectedTo: [...n.links].sort(),
  };
}

function partsOf(alive: readonly SimNode[]): EndpointId[][] {
  const byId = new Map(alive.map((n) => [n.id as string, n]));
  const seen = new Set<string>();
  const parts: EndpointId[][] = [];
  for (const start of alive) {
    if (seen.has(start.id)) continue;
    const part: EndpointId[] = [];
    const stack = [start];
    seen.add(start.id);
    for (let n = stack.pop(); n !== undefined; n = stack.pop()) {
      part.push(n.id);
      for (const l of n.links) {
        const m = byId.get(l);
        if (m !== undefined && !seen.has(l)) {
          seen.add(l);
          stack.push(m);
        }
      }
    }
    parts.push(part.sort());
  }
  return parts;
}

/** (c) convergence: once everything is delivered, every connected part agrees on one plan, the right one. */
export function convergence(impl: ElectionImpl) {
  return fc.property(scenarioArb, (sc) => {
    const out = runScenario(impl, sc);
    if (!out.settled) throw new Error(`gossip never settled (${out.deliveries} deliveries)`);
    for (const part of out.parts) {
      const plans = part.map((id) => JSON.stringify(out.plans.get(id)));
      if (new Set(plans).size !== 1) throw new Error(`part ${part.join(',')} disagrees:\n${plans.join('\n')}`);
      for (const id of part) {
        const plan = out.plans.get(id) as Plan;
        if (JSON.stringify(plan) !== JSON.stringify(out.expected.get(id))) {
          throw new Error(`${id} holds a stale plan:\n${JSON.stringify(plan)}\nexpected ${JSON.stringify(out.expected.get(id))}`);
        }
        if (plan.kind === 'ready' && plan.stages.some((s) => !part.includes(s.id))) {
          throw new Error(`${id}'s plan uses a node outside its part: ${JSON.stringify(plan)}`);
        }
      }
    }
  });
}
