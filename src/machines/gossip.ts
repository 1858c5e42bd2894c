// The gossip view: every node's latest announcement, merged as a join-semilattice so that any order
// of delivery, with duplicates, ends in the same view; and the connected part an election may use.
import type { Announcement, EndpointId, View } from './mesh-types.ts';

/** A view that knows only the node itself. */
export function emptyView(self: Announcement): View {
  return { self: self.id, announcements: { [self.id]: self } };
}

/**
 * Orders two announcements of the same node: by epoch, then seq, then (for exact ties, which only a
 * buggy or replayed sender produces) by their canonical content. Content and never arrival order breaks
 * ties, so the merge is commutative, associative and idempotent.
 */
export function compareAnnouncements(a: Announcement, b: Announcement): number {
  if (a.epoch !== b.epoch) return a.epoch < b.epoch ? -1 : 1;
  if (a.seq !== b.seq) return a.seq < b.seq ? -1 : 1;
  const ca = canonical(a);
  const cb = canonical(b);
  return ca === cb ? 0 : ca < cb ? -1 : 1;
}

/**
 * Keeps, per node id, the greatest announcement (see compareAnnouncements). `changed` says whether the
 * view gained anything, so callers can skip re-electing on gossip that taught them nothing.
 */
export function mergeAnnouncements(
  view: View,
  incoming: readonly Announcement[],
): { view: View; changed: boolean } {
  let next: Record<string, Announcement> | null = null;
  for (const a of incoming) {
    const current = (next ?? view.announcements)[a.id];
    if (current !== undefined && compareAnnouncements(a, current) <= 0) continue;
    next ??= { ...view.announcements };
    next[a.id] = a;
  }
  return next === null ? { view, changed: false } : { view: { self: view.self, announcements: next }, changed: true };
}

/**
 * Replaces the node's own announcement. The node is the only author of it, so this does not ask the
 * merge order; the caller raises `seq` so that peers' merges accept the new one.
 */
export function setSelf(view: View, self: Announcement): View {
  if (self.id !== view.self) throw new TypeError(`setSelf: announcement of ${self.id} is not this node (${view.self})`);
  return { self: view.self, announcements: { ...view.announcements, [self.id]: self } };
}

/** Whether both nodes list each other as directly connected: one-sided claims do not count. */
export function mutuallyConnected(view: View, a: EndpointId, b: EndpointId): boolean {
  const aa = view.announcements[a];
  const bb = view.announcements[b];
  return aa !== undefined && bb !== undefined && aa.connectedTo.includes(b) && bb.connectedTo.includes(a);
}

/**
 * The nodes reachable from self over mutual `connectedTo` edges, sorted by id. A dead node drops out
 * once its neighbours stop listing it; each side of a partition gets its own part.
 */
export function connectedPart(view: View): Announcement[] {
  const start = view.announcements[view.self];
  if (start === undefined) return [];
  const seen = new Map<string, Announcement>([[start.id, start]]);
  const queue: Announcement[] = [start];
  for (let a = queue.shift(); a !== undefined; a = queue.shift()) {
    for (const id of a.connectedTo) {
      if (seen.has(id)) continue;
      const b = view.announcements[id];
      if (b === undefined || !b.connectedTo.includes(a.id)) continue;
      seen.set(id, b);
      queue.push(b);
    }
  }
  return [...seen.values()].sort((x, y) => (x.id < y.id ? -1 : x.id > y.id ? 1 : 0));
}

// A stable rendering of every field, so equal content gives equal strings on every node.
function canonical(a: Announcement): string {
  return JSON.stringify([
    a.id,
    a.epoch,
    a.seq,
    a.name,
    a.role,
    a.vramBytes,
    a.model === null ? null : [a.model.name, a.model.bytes, a.model.fingerprint],
    a.version,
    a.serving,
    a.addrs,
    a.connectedTo,
  ]);
}
