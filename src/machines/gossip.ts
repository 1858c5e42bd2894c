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

/**
 * Every field of an announcement but its signature, as an array in one fixed order: what the merge's
 * tie-break compares and what the signature covers (src/io/wire/announcement-signature.ts). An array, not a
 * map: no key order to agree on. A new Announcement field goes here.
 */
export function announcementContent(a: Announcement): unknown[] {
  return [
    a.id,
    a.epoch,
    a.seq,
    a.name,
    a.role,
    a.vramBytes,
    a.model === null ? null : [a.model.name, a.model.bytes, a.model.fingerprint],
    a.version,
    a.serving,
    [...a.addrs],
    [...a.connectedTo],
    // Protocol 3: the KV sizing, only where announced (so an announcement without it signs as before).
    ...(a.kv === undefined ? [] : [[a.kv.ctxSize, a.kv.parallel, a.kv.cacheType, a.kv.flashAttn, a.kv.layers, a.kv.bytes]]),
  ];
}

// A stable rendering of every field, so equal content gives equal strings on every node.
function canonical(a: Announcement): string {
  return JSON.stringify(announcementContent(a));
}

// ---- signed facts, freshness and bounds ---------------------------------------------------------------

/** Bounds of what one node keeps of gossip, whatever its peers send. */
export const VIEW_LIMITS = {
  /** Announcements in a view (self included); beyond it the stalest unprotected ones are dropped. */
  maxAnnouncements: 256,
  /** Ids remembered as forgotten (so an old copy cannot bring them back); beyond it the oldest go. */
  maxForgotten: 1024,
  /** An id not refreshed for this many re-announcement ticks (and not protected) expires. */
  ttlTicks: 6,
} as const;

/** What a node remembers about the age of its facts. Time is a tick count the caller advances. */
export interface Freshness {
  /** Per id (never self): the tick at which we last accepted a newer valid announcement of it. */
  readonly heardAt: Readonly<Record<string, number>>;
  /** Ids dropped (expired or evicted) with the (epoch, seq) we held: only a newer announcement brings one back. */
  readonly forgotten: Readonly<Record<string, { readonly epoch: number; readonly seq: number; readonly at: number }>>;
}

export const emptyFreshness = (): Freshness => ({ heardAt: {}, forgotten: {} });

export interface AcceptOptions {
  /** Whether the announcement carries its owner's valid signature. */
  readonly verify: (a: Announcement) => boolean;
  /** The current tick. */
  readonly now: number;
  /** Ids never dropped for bounds or age (the links, the invites). */
  readonly protect?: (id: EndpointId) => boolean;
  readonly maxAnnouncements?: number;
}

export interface Accepted {
  readonly view: View;
  readonly freshness: Freshness;
  /** Accepted announcements whose facts are new to us (a new id, or anything besides seq and sig changed). */
  readonly learned: Announcement[];
  /** Accepted announcements that only refresh what we held (a newer seq, same facts): relayed, never re-elected on. */
  readonly refreshed: Announcement[];
  /** Ids dropped to keep the view within its bound. */
  readonly evicted: EndpointId[];
  /** Announcements refused for a missing or bad signature. */
  readonly rejected: number;
}

/**
 * Merges gossip into a view, accepting an announcement about X only with X's valid signature and only when it
 * is newer than what we hold (or held, if we forgot X). An accepted one refreshes X's age; the view then keeps
 * within `maxAnnouncements` by dropping the stalest unprotected ids. Never accepts a fact about self.
 * Verification runs only on announcements that would be accepted, so replays cost a comparison.
 */
export function acceptGossip(view: View, freshness: Freshness, incoming: readonly Announcement[], options: AcceptOptions): Accepted {
  let next: Record<string, Announcement> | null = null;
  let heardAt: Record<string, number> | null = null;
  let forgotten: Record<string, { epoch: number; seq: number; at: number }> | null = null;
  const learned = new Map<string, Announcement>();
  const refreshed = new Map<string, Announcement>();
  let rejected = 0;
  for (const a of incoming) {
    if (a.id === view.self) continue;
    const current = (next ?? view.announcements)[a.id];
    if (current !== undefined && compareAnnouncements(a, current) <= 0) continue;
    const gone = (forgotten ?? freshness.forgotten)[a.id];
    if (current === undefined && gone !== undefined && !newerThan(a, gone)) continue;
    if (!options.verify(a)) {
      rejected++;
      continue;
    }
    next ??= { ...view.announcements };
    heardAt ??= { ...freshness.heardAt };
    next[a.id] = a;
    heardAt[a.id] = options.now;
    if (gone !== undefined) {
      forgotten ??= { ...freshness.forgotten };
      delete forgotten[a.id];
    }
    const previous = current ?? view.announcements[a.id];
    if (previous !== undefined && !learned.has(a.id) && sameFacts(previous, a)) refreshed.set(a.id, a);
    else {
      refreshed.delete(a.id);
      learned.set(a.id, a);
    }
  }
  if (next === null || heardAt === null) return { view, freshness, learned: [], refreshed: [], evicted: [], rejected };
  let result: Accepted = {
    view: { self: view.self, announcements: next },
    freshness: { heardAt, forgotten: forgotten ?? freshness.forgotten },
    learned: [...learned.values()],
    refreshed: [...refreshed.values()],
    evicted: [],
    rejected,
  };
  const max = options.maxAnnouncements ?? VIEW_LIMITS.maxAnnouncements;
  const size = Object.keys(next).length;
  if (size > max) {
    const protect = options.protect ?? (() => false);
    // Stalest first; among equals, the greater id goes first (any fixed order would do).
    const candidates = Object.keys(next)
      .filter((id) => id !== view.self && !protect(id as EndpointId))
      .sort((x, y) => (heardAt[x] ?? -1) - (heardAt[y] ?? -1) || (x < y ? 1 : x > y ? -1 : 0));
    const evicted = candidates.slice(0, size - max) as EndpointId[];
    const dropped = forget(result.view, result.freshness, evicted, options.now);
    const out = new Set<string>(evicted);
    result = {
      ...result,
      view: dropped.view,
      freshness: dropped.freshness,
      learned: result.learned.filter((a) => !out.has(a.id)),
      refreshed: result.refreshed.filter((a) => !out.has(a.id)),
      evicted,
    };
  }
  return result;
}

/**
 * The ids whose facts nobody refreshed for `ttlTicks` (no newer valid announcement reached us), except self
 * and protected ids; dropped from the view and remembered as forgotten. The node's own periodic
 * re-announcement keeps every live node fresh in the views of those that can hear it.
 */
export function expireStale(
  view: View,
  freshness: Freshness,
  options: { readonly now: number; readonly protect?: (id: EndpointId) => boolean; readonly ttlTicks?: number },
): { view: View; freshness: Freshness; expired: EndpointId[] } {
  const ttl = options.ttlTicks ?? VIEW_LIMITS.ttlTicks;
  const protect = options.protect ?? (() => false);
  const expired = Object.keys(view.announcements).filter(
    (id) => id !== view.self && !protect(id as EndpointId) && options.now - (freshness.heardAt[id] ?? options.now) >= ttl,
  ) as EndpointId[];
  if (expired.length === 0) return { view, freshness, expired };
  return { ...forget(view, freshness, expired, options.now), expired };
}

/** Drops ids from a view, remembering what we held of them; the forgotten list stays within its bound. */
export function forget(view: View, freshness: Freshness, ids: readonly EndpointId[], now: number): { view: View; freshness: Freshness } {
  const announcements = { ...view.announcements };
  const heardAt = { ...freshness.heardAt };
  const forgotten = { ...freshness.forgotten };
  for (const id of ids) {
    const a = announcements[id];
    if (a === undefined || id === view.self) continue;
    delete announcements[id];
    delete heardAt[id];
    delete forgotten[id]; // re-inserted last: the newest
    forgotten[id] = { epoch: a.epoch, seq: a.seq, at: now };
  }
  const keys = Object.keys(forgotten);
  if (keys.length > VIEW_LIMITS.maxForgotten) {
    const oldest = keys.sort((x, y) => forgotten[x]!.at - forgotten[y]!.at).slice(0, keys.length - VIEW_LIMITS.maxForgotten);
    for (const id of oldest) delete forgotten[id];
  }
  return { view: { self: view.self, announcements }, freshness: { heardAt, forgotten } };
}

/** The view without the given ids (self always stays). */
export function withoutIds(view: View, ids: readonly EndpointId[]): View {
  const drop = ids.filter((id) => id !== view.self && view.announcements[id] !== undefined);
  if (drop.length === 0) return view;
  const announcements = { ...view.announcements };
  for (const id of drop) delete announcements[id];
  return { self: view.self, announcements };
}

/** Whether two announcements of one node say the same (seq and signature aside). */
export function sameFacts(a: Announcement, b: Announcement): boolean {
  return a.epoch === b.epoch && canonical({ ...a, seq: 0 }) === canonical({ ...b, seq: 0 });
}

function newerThan(a: Announcement, held: { readonly epoch: number; readonly seq: number }): boolean {
  return a.epoch !== held.epoch ? a.epoch > held.epoch : a.seq > held.seq;
}
