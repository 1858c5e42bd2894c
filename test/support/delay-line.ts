// One direction of an emulated link (test/support/link-emulator.ts): its shape (delay, jitter, loss, rate),
// its counters, and the delay line that holds what crosses it until it is due.
import { performance } from 'node:perf_hooks';

/** What one direction of a link does to what crosses it. */
export interface LinkShape {
  /** One-way delay, ms. */
  readonly delayMs: number;
  /** Each datagram/chunk gets an extra delay uniform in [0, jitterMs). Default 0. */
  readonly jitterMs?: number;
  /** Probability (0..1) that a datagram is dropped (UDP) or must be retransmitted (TCP). Default 0. */
  readonly loss?: number;
  /** Bytes per second; default unlimited. */
  readonly bytesPerSecond?: number;
}

/** A link that is the same both ways: `rttMs` split into two equal one-way delays. */
export function symmetricShape(rttMs: number, extra: Omit<LinkShape, 'delayMs'> = {}): LinkShape {
  return { delayMs: rttMs / 2, ...extra };
}

export interface DirectionCounters {
  /** Datagrams (UDP) or chunks (TCP) handed to the link. */
  packets: number;
  bytes: number;
  /** Delivered to the other side. */
  deliveredPackets: number;
  deliveredBytes: number;
  /** UDP: dropped by loss, a cut or a full queue. TCP: chunks that paid the retransmission penalty. */
  lostPackets: number;
}

export interface RelayCounters {
  /** Towards the target (client -> target). */
  readonly forward: DirectionCounters;
  /** From the target back (target -> client). */
  readonly backward: DirectionCounters;
  /** UDP: sources seen (mappings); TCP: connections accepted. */
  readonly sessions: number;
}

export const emptyCounters = (): DirectionCounters => ({ packets: 0, bytes: 0, deliveredPackets: 0, deliveredBytes: 0, lostPackets: 0 });

/** Linux's minimum retransmission timeout: what a lost TCP segment costs at least, besides a round trip. */
export const TCP_MIN_RTO_MS = 200;

/**
 * One direction of a link: items go in, and come out after the shape's delay, in order when `ordered`
 * (TCP), possibly reordered by jitter otherwise (UDP). Pacing: each item occupies the line for
 * bytes / rate, so a burst queues behind itself.
 */
export class DelayLine<T> {
  private queue: { at: number; item: T; bytes: number }[] = [];
  private timer: NodeJS.Timeout | null = null;
  private lineFreeAt = 0;
  private lastArrival = 0;
  private held = false;
  queuedBytes = 0;
  readonly counters = emptyCounters();

  constructor(
    public shape: LinkShape,
    private readonly ordered: boolean,
    private readonly deliver: (item: T) => void,
    private readonly random: () => number,
  ) {}

  /** When a datagram of `bytes` sent now would arrive (before the queue limit is checked). */
  private arrivalFor(bytes: number, now: number): number {
    const rate = this.shape.bytesPerSecond;
    const departure = rate ? Math.max(now, this.lineFreeAt) + (bytes / rate) * 1000 : now;
    this.lineFreeAt = departure;
    return departure + this.shape.delayMs + (this.shape.jitterMs ? this.random() * this.shape.jitterMs : 0);
  }

  /** Queue an item; false when it was dropped (UDP loss). `lossPenaltyMs`: TCP's cost of a lost chunk. */
  push(item: T, bytes: number, lossPenaltyMs: number | null): boolean {
    const now = performance.now();
    this.counters.packets++;
    this.counters.bytes += bytes;
    let at = this.arrivalFor(bytes, now);
    const lost = (this.shape.loss ?? 0) > 0 && this.random() < this.shape.loss!;
    if (lost) {
      this.counters.lostPackets++;
      if (lossPenaltyMs === null) return false;
      at += lossPenaltyMs;
    }
    if (this.ordered) at = Math.max(at, this.lastArrival);
    this.lastArrival = at;
    this.queuedBytes += bytes;
    // Arrival times only grow when ordered; with jitter insert in place (queues are short).
    let i = this.queue.length;
    while (i > 0 && this.queue[i - 1]!.at > at) i--;
    this.queue.splice(i, 0, { at, item, bytes });
    if (i === 0) this.schedule();
    return true;
  }

  /** Items wait (a partition) until release(); arrival times keep running meanwhile. */
  hold(): void {
    this.held = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  release(): void {
    this.held = false;
    this.schedule();
  }

  /** Forget everything queued (UDP during a cut, or a closed connection). */
  clear(): void {
    this.counters.lostPackets += this.queue.length;
    this.queue = [];
    this.queuedBytes = 0;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private schedule(): void {
    if (this.held) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const head = this.queue[0];
    if (!head) return;
    const wait = head.at - performance.now();
    if (wait <= 0) this.flush();
    else this.timer = setTimeout(() => this.flush(), wait);
  }

  private flush(): void {
    this.timer = null;
    const now = performance.now();
    // Timers fire up to a millisecond early or late: deliver what is due within a quarter millisecond.
    while (!this.held && this.queue.length > 0 && this.queue[0]!.at <= now + 0.25) {
      const { item, bytes } = this.queue.shift()!;
      this.queuedBytes -= bytes;
      this.counters.deliveredPackets++;
      this.counters.deliveredBytes += bytes;
      this.deliver(item);
    }
    this.schedule();
  }
}
