// The host's watch over its rpc tunnels: is a stage still answering? llama.cpp's RPC client waits forever for a
// reply (FIELD-FACTS.md: a SIGSTOPped rpc-server, or a silent path, hangs llama-server with /health still ok),
// and the worker's node may be perfectly alive meanwhile (heartbeats fine), so only the traffic tells.
//
// Each local connection that llama-server (or the counting proxy before it) makes to a worker's tunnel
// listener is watched where it enters the node, before the choice of data path, so QUIC and the direct path
// look the same: requests are the bytes llama-server sends, replies the bytes written back to it. A request
// that gets a reply (rpc-boundary.ts knows which) starts a wait; any reply byte is progress. A connection
// whose wait has seen no reply byte for the bound is a hung stage, reported once per connection:
//
//   bound = max(floorMs (15 s), factor (20) x p99 of the recent reply times to that worker)
//
// A fixed bound would either fire during a long prefill on a loaded CPU node (and loop: restart, the same
// prefill, fire again) or wait far too long on a fast GPU stage; the worker's own reply times scale it. The
// reply time of one reply is from when the server could start on it (its request sent, the reply before it
// done) to its last byte. Bytes that do not parse as RPC turn the watch off for that connection: it never
// guesses. Connections llama-server makes to a worker's data port itself (patch 0003) never cross this node
// and are not watched (docs/node.md says what covers them).
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { RpcBoundaryScanner } from './rpc-boundary.ts';

/** What the watch reports: a stage that owes a reply and has sent nothing for `boundMs`. */
export interface StageStall {
  readonly peer: EndpointId;
  readonly planId: string | null;
  readonly waitedMs: number;
  readonly boundMs: number;
  /** The p99 reply time the bound came from (null: no replies seen yet, the floor applies). */
  readonly p99Ms: number | null;
}

export interface StageWatchInit {
  /** The bound never goes below this. Default 15 s. */
  readonly floorMs?: number;
  /** x p99 of the recent reply times. Default 20. */
  readonly factor?: number;
  /** How often waits are checked. Default 500 ms. */
  readonly checkEveryMs?: number;
  /** Reply times kept per worker for the p99. Default 512. */
  readonly keep?: number;
}

export const STALL_FLOOR_MS = 15_000;
export const STALL_FACTOR = 20;

/** The wait of one connection: requests that owe a reply, and when the last reply byte (or request) came. */
export class RpcReplyClock {
  private readonly requests = new RpcBoundaryScanner('requests');
  private readonly replies = new RpcBoundaryScanner('replies');
  /** When each owed reply could start: its request's last byte (replies come in order). */
  private readonly owed: number[] = [];
  /** Since when the connection waits without a reply byte. */
  private quietSince = 0;
  private lastReplyEnd = 0;

  constructor(private readonly record: (replyMs: number) => void) {}

  /** Off: the bytes are not RPC as we know it; nothing is judged. */
  get off(): boolean {
    return this.requests.off || this.replies.off;
  }

  request(chunk: Uint8Array, now: number): void {
    if (this.off) return;
    const before = this.requests.answered;
    this.requests.scan(chunk);
    for (let i = before; i < this.requests.answered; i++) {
      if (this.owed.length === 0) this.quietSince = now;
      this.owed.push(now);
    }
  }

  reply(chunk: Uint8Array, now: number): void {
    if (this.off) return;
    this.quietSince = now;
    const before = this.replies.answered;
    this.replies.scan(chunk);
    for (let i = before; i < this.replies.answered; i++) {
      const sent = this.owed.shift();
      if (sent === undefined) continue; // a reply nobody asked for: the scanner will have turned off
      this.record(now - Math.max(sent, this.lastReplyEnd));
      this.lastReplyEnd = now;
    }
  }

  /** How long a reply has been owed with no reply byte; 0 when none is owed. */
  waiting(now: number): number {
    return this.off || this.owed.length === 0 ? 0 : now - this.quietSince;
  }
}

interface Watched {
  readonly peer: EndpointId;
  readonly planId: string | null;
  readonly clock: RpcReplyClock;
  reported: boolean;
}

/** The watch of one node's rpc tunnels (one per TunnelService); calls `onStall` once per hung connection. */
export class StageWatch {
  private readonly floorMs: number;
  private readonly factor: number;
  private readonly keep: number;
  private readonly watched = new Set<Watched>();
  private readonly times = new Map<EndpointId, number[]>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    init: StageWatchInit,
    private readonly onStall: (s: StageStall) => void,
  ) {
    this.floorMs = init.floorMs ?? STALL_FLOOR_MS;
    this.factor = init.factor ?? STALL_FACTOR;
    this.keep = init.keep ?? 512;
    this.timer = setInterval(() => this.check(), init.checkEveryMs ?? 500);
    this.timer.unref();
  }

  /**
   * Watches one local connection to `peer`'s rpc tunnel: the socket must be paused (explicitly), so that the
   * listener added here does not start the flow before the path's own pump is attached.
   */
  attach(peer: EndpointId, planId: string | null, socket: Socket): void {
    const clock = new RpcReplyClock((ms) => this.note(peer, ms));
    const w: Watched = { peer, planId, clock, reported: false };
    this.watched.add(w);
    socket.on('data', (b: Buffer) => clock.request(b, performance.now()));
    // Replies are what the path writes back to the local socket (the QUIC pipe and the direct relay alike).
    const write = socket.write;
    socket.write = function (this: Socket, chunk: unknown, ...rest: unknown[]) {
      if (chunk instanceof Uint8Array) clock.reply(chunk, performance.now());
      return (write as (...a: unknown[]) => boolean).apply(this, [chunk, ...rest]);
    } as Socket['write'];
    socket.once('close', () => this.watched.delete(w));
  }

  /** The bound for `peer` now, and the p99 it came from. */
  bound(peer: EndpointId): { boundMs: number; p99Ms: number | null } {
    const list = this.times.get(peer);
    if (list === undefined || list.length === 0) return { boundMs: this.floorMs, p99Ms: null };
    const sorted = [...list].sort((a, b) => a - b);
    const p99Ms = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]!;
    return { boundMs: Math.max(this.floorMs, this.factor * p99Ms), p99Ms };
  }

  close(): void {
    clearInterval(this.timer);
    this.watched.clear();
  }

  private note(peer: EndpointId, ms: number): void {
    let list = this.times.get(peer);
    if (list === undefined) this.times.set(peer, (list = []));
    list.push(ms);
    if (list.length > this.keep) list.shift();
  }

  private check(): void {
    const now = performance.now();
    for (const w of this.watched) {
      if (w.reported) continue;
      const waitedMs = w.clock.waiting(now);
      if (waitedMs === 0) continue;
      const { boundMs, p99Ms } = this.bound(w.peer);
      if (waitedMs < boundMs) continue;
      w.reported = true;
      this.onStall({ peer: w.peer, planId: w.planId, waitedMs: Math.round(waitedMs), boundMs: Math.round(boundMs), p99Ms: p99Ms === null ? null : Math.round(p99Ms * 10) / 10 });
    }
  }
}
