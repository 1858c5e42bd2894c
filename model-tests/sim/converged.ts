// What "converged" means, judged from what really runs: for every connected part of the true network, the
// processes in the fake table are exactly what the product's own election makes of the part's true facts.
import { elect } from '../../src/machines/election.ts';
import type { Announcement, EndpointId, Plan, View } from '../../src/machines/mesh-types.ts';
import { PROTOCOL_VERSION } from '../../src/machines/mesh-types.ts';
import type { SimNode, SimWorld } from './world.ts';

/**
 * The connected parts of the true world: nodes that can reach each other (same side of a partition, not hung)
 * and that find each other, directly or through gossip (at least one of each linked pair has heard of the
 * other). A joiner whose only invites sit across a partition is a part of its own until the partition heals.
 */
export function trueParts(world: SimWorld): SimNode[][] {
  const up = world.upNodes();
  const side = (n: SimNode) => (world.net.isHung(n.spec.id) ? `hung:${n.spec.id}` : `group:${world.net.groupOf(n.spec.id)}`);
  const linked = (a: SimNode, b: SimNode) =>
    side(a) === side(b) && (world.willDial(a.spec.id, b.spec.id) || world.willDial(b.spec.id, a.spec.id));
  const parts: SimNode[][] = [];
  const placed = new Set<SimNode>();
  for (const start of up) {
    if (placed.has(start)) continue;
    const part = [start];
    placed.add(start);
    for (let i = 0; i < part.length; i++) {
      for (const other of up) {
        if (!placed.has(other) && linked(part[i]!, other)) {
          placed.add(other);
          part.push(other);
        }
      }
    }
    parts.push(part);
  }
  return parts;
}

/** The plan a part must run: `elect` over the part's true facts (everyone connected to everyone). */
export function expectedPlan(part: readonly SimNode[]): Plan {
  const ids = part.map((n) => n.spec.id).sort();
  const announcements: Record<string, Announcement> = {};
  for (const n of part) {
    announcements[n.spec.id] = {
      id: n.spec.id,
      epoch: n.epoch,
      seq: 0,
      name: n.spec.id,
      role: n.spec.role,
      vramBytes: n.spec.vramBytes,
      model: n.spec.model,
      version: PROTOCOL_VERSION,
      serving: false,
      addrs: [],
      connectedTo: ids.filter((x) => x !== n.spec.id),
    };
  }
  // Any node holding the model sees the same plan; a part of lite clients only waits.
  const self = part.find((n) => n.spec.model !== null && n.spec.role !== 'client') ?? part[0]!;
  const view: View = { self: self.spec.id, announcements };
  return elect(view);
}

/** One way the world differs from what it must converge to. `two-hosts`: a part runs several llama-servers. */
export interface Gap {
  readonly kind: 'two-hosts' | 'gap';
  readonly message: string;
}

/** Why the world is not (yet) converged; empty when it is. */
export function convergenceGaps(world: SimWorld): Gap[] {
  const gaps: Gap[] = [];
  const push = (message: string) => gaps.push({ kind: 'gap', message });
  for (const part of trueParts(world)) {
    const plan = expectedPlan(part);
    const members = new Set<EndpointId>(part.map((n) => n.spec.id));
    const names = [...members].sort().join(',');
    // Processes can match the plan by coincidence before the part has even reconnected: a full mesh first.
    const ids = [...members].sort();
    const missing = ids.flatMap((a, i) => ids.slice(i + 1).filter((b) => !world.net.hasLink(a, b)).map((b) => `${a}-${b}`));
    if (missing.length > 0) push(`[${names}] not fully connected yet: no connection ${missing.slice(0, 4).join(', ')}`);
    if (plan.kind === 'waiting') {
      for (const id of members) {
        const live = world.table.liveOf(id);
        if (live.length > 0) push(`[${names}] waits (${plan.reason}) but ${id} runs ${live.map((p) => p.kind).join('+')}`);
      }
      continue;
    }
    const stageIds = new Set(plan.stages.map((s) => s.id));
    const llamas = part.flatMap((n) => world.table.liveOf(n.spec.id, 'llama'));
    const hosts = new Set(llamas.map((p) => p.node));
    if (hosts.size > 1) {
      gaps.push({ kind: 'two-hosts', message: `[${names}] runs llama-servers on ${[...hosts].sort().join(' and ')}` });
    }
    const hostLlama = llamas.find((p) => p.node === plan.host && p.planId === plan.id && p.readyAt !== null);
    if (llamas.length !== 1 || hostLlama === undefined) {
      push(
        `[${names}] should have one llama-server on ${plan.host} for plan ${plan.id}, has ` +
          (llamas.length === 0 ? 'none' : llamas.map((p) => `${p.node}/${p.planId}${p.readyAt === null ? '(loading)' : ''}`).join(' ')),
      );
    }
    for (const id of members) {
      const rpcs = world.table.liveOf(id, 'rpc');
      if (!stageIds.has(id)) {
        const live = world.table.liveOf(id);
        if (live.length > 0) push(`[${names}] ${id} is no stage of ${plan.id} but runs ${live.map((p) => p.kind).join('+')}`);
        continue;
      }
      if (rpcs.length !== 1) {
        push(`[${names}] stage ${id} runs ${rpcs.length} rpc-servers`);
        continue;
      }
      const clients = [...rpcs[0]!.peers];
      if (hostLlama !== undefined && (clients.length !== 1 || clients[0] !== hostLlama.pid)) {
        push(`[${names}] rpc-server of ${id} serves [${clients.join(',')}], not the host's llama-server #${hostLlama.pid}`);
      }
    }
  }
  return gaps;
}
