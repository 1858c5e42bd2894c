// The simulator's in-memory network: one connection per pair, ordered reliable streams (a message that cannot
// get through waits and retries, as QUIC retransmits, until the connection is closed), partitions, hung nodes,
// latency and loss (a lost packet costs a retransmission delay, and holds back what follows it). It logs what
// was really sent, which the invariant checker reads instead of any machine's context.
import { sameFacts } from '../../src/machines/gossip.ts';
import type { Announcement, EndpointId } from '../../src/machines/mesh-types.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from '../../src/machines/protocol.ts';
import type { Prng } from './prng.ts';
import type { SimScheduler } from './scheduler.ts';

export interface NetworkConditions {
  /** One-way latency bounds in ms. */
  latencyMs: readonly [number, number];
  /** Probability that a message needs a retransmission. */
  lossRate: number;
  /** What one retransmission costs, ms. */
  retransmitMs: number;
}

export const CALM: NetworkConditions = { latencyMs: [2, 20], lossRate: 0, retransmitMs: 200 };

interface Link {
  readonly n: number; // incarnation: messages of a closed connection never leak into a new one
  readonly a: EndpointId;
  readonly b: EndpointId;
  open: boolean;
}

interface Pending {
  readonly message: MeshMessage;
  readonly dueAt: number;
}

interface Stream {
  readonly link: Link;
  readonly from: EndpointId;
  readonly to: EndpointId;
  queue: Pending[];
  pumping: boolean;
}

export interface RpcReadyRecord {
  readonly at: number;
  readonly from: EndpointId;
  readonly to: EndpointId;
  readonly planId: string;
}

type Deliver = (event: NetworkEvent) => void;

const RETRY_MS = 250;

export class SimNetwork {
  private endpoints = new Map<EndpointId, Deliver>();
  private links = new Map<string, Link>();
  private streams = new Map<string, Stream>();
  private group = new Map<EndpointId, number>();
  private hung = new Set<EndpointId>();
  private linkCount = 0;
  private closeListeners: ((a: EndpointId, b: EndpointId) => void)[] = [];
  private deliverListeners: ((to: EndpointId, event: NetworkEvent) => void)[] = [];
  conditions: NetworkConditions = CALM;

  /** Every message accepted onto a connection. */
  sent = 0;
  delivered = 0;
  /** When the last message other than a heartbeat was sent: the mesh is busy until this goes stale. */
  lastBusyAt = 0;
  /** Every rpc-ready that was really sent, per sender. */
  readonly rpcReady = new Map<EndpointId, RpcReadyRecord[]>();

  constructor(
    private readonly sched: SimScheduler,
    private readonly prng: Prng,
  ) {}

  // ---- world control (the scenario) --------------------------------------------------------------------

  attach(id: EndpointId, deliver: Deliver): void {
    this.endpoints.set(id, deliver);
  }

  /** The node is gone. `graceful`: what it already sent still arrives, then its peers see the close. */
  detach(id: EndpointId, graceful: boolean): void {
    this.endpoints.delete(id);
    for (const link of [...this.links.values()]) {
      if (link.a !== id && link.b !== id) continue;
      const other = link.a === id ? link.b : link.a;
      if (graceful) this.closeAfterFlush(link, id, other);
      else this.removeLink(link);
    }
  }

  /** Splits the nodes into groups that cannot reach each other (group 0 for anyone not listed). */
  partition(groups: ReadonlyMap<EndpointId, number>): void {
    this.group = new Map(groups);
  }

  heal(): void {
    this.group.clear();
  }

  setHung(id: EndpointId, hung: boolean): void {
    if (hung) this.hung.add(id);
    else this.hung.delete(id);
  }

  isHung(id: EndpointId): boolean {
    return this.hung.has(id);
  }

  groupOf(id: EndpointId): number {
    return this.group.get(id) ?? 0;
  }

  reachable(a: EndpointId, b: EndpointId): boolean {
    return (
      this.endpoints.has(a) &&
      this.endpoints.has(b) &&
      !this.hung.has(a) &&
      !this.hung.has(b) &&
      this.groupOf(a) === this.groupOf(b)
    );
  }

  hasLink(a: EndpointId, b: EndpointId): boolean {
    return this.links.get(key(a, b))?.open === true;
  }

  /** Tunnels ride on connections: tell whoever holds one when its connection closes. */
  onLinkClosed(fn: (a: EndpointId, b: EndpointId) => void): void {
    this.closeListeners.push(fn);
  }

  /** Messages still queued on some connection. */
  inFlight(): number {
    let n = 0;
    for (const s of this.streams.values()) n += s.queue.length;
    return n;
  }

  // ---- the node side (the `network` actor slot) ----------------------------------------------------------

  command(from: EndpointId, cmd: NetworkCommand): void {
    if (!this.endpoints.has(from)) return;
    switch (cmd.type) {
      case 'net.dial':
        return this.dial(from, cmd.id);
      case 'net.send':
        return this.send(from, cmd.to, cmd.message);
      case 'net.close': {
        const link = this.links.get(key(from, cmd.id));
        if (link === undefined) return;
        this.removeLink(link);
        // A CONNECTION_CLOSE reaches the other side only if a packet can.
        this.later(() => {
          if (this.reachable(from, cmd.id)) this.emit(cmd.id, { type: 'net.peer.disconnected', id: from, reason: cmd.reason });
        });
        return;
      }
    }
  }

  private dial(from: EndpointId, to: EndpointId): void {
    if (from === to) return;
    this.later(() => {
      if (!this.reachable(from, to)) return; // the dial fails silently: the peer machine times out
      const existing = this.links.get(key(from, to));
      if (existing?.open === true) {
        this.emit(from, { type: 'net.peer.connected', id: to, direct: true });
        return;
      }
      const link: Link = { n: ++this.linkCount, a: from, b: to, open: true };
      this.links.set(key(from, to), link);
      this.emit(from, { type: 'net.peer.connected', id: to, direct: true });
      this.emit(to, { type: 'net.peer.connected', id: from, direct: true });
    });
  }

  // The latest announcement of each node that any gossip carried: a gossip whose announcements all say what
  // their nodes said before (a periodic re-announcement: a new seq, the same facts) changes nothing.
  private lastFacts = new Map<EndpointId, Announcement>();

  private isRefreshOnly(message: MeshMessage): boolean {
    if (message.type !== 'gossip') return false;
    let refreshOnly = true;
    for (const a of message.announcements) {
      const last = this.lastFacts.get(a.id);
      if (last === undefined || !sameFacts(last, a)) refreshOnly = false;
      if (last === undefined || a.epoch > last.epoch || (a.epoch === last.epoch && a.seq > last.seq)) this.lastFacts.set(a.id, a);
    }
    return refreshOnly;
  }

  private send(from: EndpointId, to: EndpointId, message: MeshMessage): void {
    const link = this.links.get(key(from, to));
    if (link === undefined || !link.open) return; // no connection: dropped, as the contract says
    this.sent++;
    if (message.type !== 'heartbeat' && message.type !== 'heartbeat-ack' && !this.isRefreshOnly(message)) this.lastBusyAt = this.sched.now();
    if (message.type === 'rpc-ready') {
      const list = this.rpcReady.get(from) ?? [];
      list.push({ at: this.sched.now(), from, to, planId: message.planId });
      this.rpcReady.set(from, list);
    }
    const stream = this.stream(link, from, to);
    let dueAt = this.sched.now() + this.latency();
    while (this.prng.chance(this.conditions.lossRate)) dueAt += this.conditions.retransmitMs;
    stream.queue.push({ message, dueAt });
    this.pump(stream);
  }

  private stream(link: Link, from: EndpointId, to: EndpointId): Stream {
    const k = `${link.n}:${from}>${to}`;
    let s = this.streams.get(k);
    if (s === undefined) {
      s = { link, from, to, queue: [], pumping: false };
      this.streams.set(k, s);
    }
    return s;
  }

  // Delivers the head of a stream when it is due and can get through; in order, never skipping.
  private pump(stream: Stream): void {
    if (stream.pumping) return;
    const head = stream.queue[0];
    if (head === undefined) return;
    stream.pumping = true;
    this.sched.setTimeout(() => {
      stream.pumping = false;
      if (!stream.link.open) {
        stream.queue = [];
        return;
      }
      if (!this.reachable(stream.from, stream.to)) {
        // Retransmit later; the connection dies only when someone closes it.
        stream.pumping = true;
        this.sched.setTimeout(() => {
          stream.pumping = false;
          this.pump(stream);
        }, RETRY_MS);
        return;
      }
      const now = this.sched.now();
      while (stream.queue.length > 0 && stream.queue[0]!.dueAt <= now && stream.link.open) {
        const { message } = stream.queue.shift()!;
        this.delivered++;
        this.emit(stream.to, { type: 'net.message', from: stream.from, message });
      }
      this.pump(stream);
    }, Math.max(0, head.dueAt - this.sched.now()));
  }

  private closeAfterFlush(link: Link, leaver: EndpointId, other: EndpointId): void {
    const out = this.streams.get(`${link.n}:${leaver}>${other}`);
    const wait = out === undefined || out.queue.length === 0 ? 0 : Math.max(0, out.queue[out.queue.length - 1]!.dueAt - this.sched.now());
    this.sched.setTimeout(() => {
      if (!link.open) return;
      if (out !== undefined && out.queue.length > 0 && this.reachable(leaver, other)) {
        // Still flushing (retransmissions): look again shortly.
        return this.closeAfterFlush(link, leaver, other);
      }
      this.removeLink(link);
      this.emit(other, { type: 'net.peer.disconnected', id: leaver, reason: 'connection closed by peer' });
    }, wait + 1);
  }

  private removeLink(link: Link): void {
    if (!link.open) return;
    link.open = false;
    if (this.links.get(key(link.a, link.b)) === link) this.links.delete(key(link.a, link.b));
    this.streams.delete(`${link.n}:${link.a}>${link.b}`);
    this.streams.delete(`${link.n}:${link.b}>${link.a}`);
    for (const fn of this.closeListeners) fn(link.a, link.b);
  }

  /** Every event really handed to a node, for whoever tracks what nodes have learned. */
  onDeliver(fn: (to: EndpointId, event: NetworkEvent) => void): void {
    this.deliverListeners.push(fn);
  }

  private emit(to: EndpointId, event: NetworkEvent): void {
    // A hung node's event loop is stuck: what reaches it is lost with the connection's patience.
    if (this.hung.has(to)) return;
    const deliver = this.endpoints.get(to);
    if (deliver === undefined) return;
    for (const fn of this.deliverListeners) fn(to, event);
    deliver(event);
  }

  private later(fn: () => void): void {
    this.sched.setTimeout(fn, this.latency());
  }

  private latency(): number {
    const [lo, hi] = this.conditions.latencyMs;
    return this.prng.int(lo, hi);
  }
}

function key(a: EndpointId, b: EndpointId): string {
  return a < b ? `${a}|${b}` : `${b}|${a}`;
}
