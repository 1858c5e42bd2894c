// A deterministic clock for the simulator: implements XState's Clock, so every node's delays, the network's
// deliveries and the fake processes share one timeline; a binary heap keeps (time, insertion order).
import type { ActorOptions, AnyActorLogic } from 'xstate';

// XState does not export its Clock interface by name; this is it.
type Clock = NonNullable<ActorOptions<AnyActorLogic>['clock']>;

interface Timer {
  readonly at: number;
  readonly seq: number;
  readonly fn: () => void;
  cancelled: boolean;
}

export class SimScheduler implements Clock {
  private heap: Timer[] = [];
  private byId = new Map<number, Timer>();
  private nextSeq = 0;
  private nowMs = 0;
  /** How many callbacks ran: the simulator's "events". */
  fired = 0;

  now(): number {
    return this.nowMs;
  }

  setTimeout(fn: (...args: unknown[]) => void, timeout: number): number {
    const t: Timer = { at: this.nowMs + Math.max(0, timeout), seq: this.nextSeq++, fn, cancelled: false };
    this.push(t);
    this.byId.set(t.seq, t);
    return t.seq;
  }

  clearTimeout(id: number): void {
    const t = this.byId.get(id);
    if (t !== undefined) {
      t.cancelled = true;
      this.byId.delete(id);
    }
  }

  /** Runs every callback due up to and including `until`, in order, then sets the clock to `until`. */
  runUntil(until: number): void {
    for (;;) {
      const t = this.heap[0];
      if (t === undefined || t.at > until) break;
      this.pop();
      if (t.cancelled) continue;
      this.byId.delete(t.seq);
      this.nowMs = t.at;
      this.fired++;
      t.fn();
    }
    this.nowMs = Math.max(this.nowMs, until);
  }

  private push(t: Timer): void {
    const h = this.heap;
    h.push(t);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }

  private pop(): void {
    const h = this.heap;
    const last = h.pop()!;
    if (h.length === 0) return;
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && before(h[l]!, h[m]!)) m = l;
      if (r < h.length && before(h[r]!, h[m]!)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m]!, h[i]!];
      i = m;
    }
  }
}

function before(a: Timer, b: Timer): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}
