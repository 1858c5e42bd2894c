// One peer's session in the network layer: its states, its record, and the writer of its control stream
// (frames queue while a write is in flight and leave as one write; a peer that stops reading is found by
// the queue's cap).
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { HelloMessage } from '../../machines/protocol.ts';
import type { ExpiringInvite } from '../wire/invite-token.ts';
import type { MeshConnection, MeshStream } from '../transport/transport.ts';

/** handshaking -> admitted -> closing -> closed; handshaking may go straight to closing or closed. */
export type SessionState = 'handshaking' | 'admitted' | 'closing' | 'closed';

export interface Session {
  readonly id: EndpointId;
  readonly conn: MeshConnection;
  readonly log: Logger;
  state: SessionState;
  /** Whether the node knows of this peer (it dialed it, or we reported it connected): only then does the
   * node hear how the session ends. Cleared once that is reported, so it is reported exactly once. */
  reported: boolean;
  stream: MeshStream | null;
  readonly out: ControlWriter;
  helloTimer: NodeJS.Timeout | null;
  /** A joiner's session to its inviter: the expiring invite presented in our hello (we hold no secret yet). */
  invite?: ExpiringInvite;
  /** With `invite`: the inviter's hello, held until its welcome brings the secret that proves it. */
  pendingHello?: HelloMessage;
  /** Resolves once the session is closed (teardown ran). */
  readonly done: Promise<void>;
  markDone: () => void;
}

export function doneSignal(): { done: Promise<void>; markDone: () => void } {
  let markDone!: () => void;
  const done = new Promise<void>((r) => (markDone = r));
  return { done, markDone };
}

/** The outgoing side of a control stream. One writer per stream: awaiting each write is the backpressure. */
export class ControlWriter {
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;
  private writing: Promise<void> | null = null;
  private stream: MeshStream | null = null;

  constructor(
    private readonly maxQueuedBytes: number,
    /** A write failed: the stream is no good any more. */
    private readonly onError: (err: unknown) => void,
  ) {}

  /** Frames queued from now on go out on `stream`. */
  attach(stream: MeshStream): void {
    this.stream = stream;
  }

  /** Queues a frame; false (and nothing queued) when it would take the queue over its cap. */
  push(frame: Uint8Array): boolean {
    if (this.queuedBytes + frame.length > this.maxQueuedBytes) return false;
    this.queue.push(frame);
    this.queuedBytes += frame.length;
    if (!this.writing && this.stream) this.writing = this.pump(this.stream);
    return true;
  }

  /** Resolves once nothing is being written (what was queued is out, or failed). */
  async drained(): Promise<void> {
    while (this.writing) await this.writing;
  }

  /** Drops what is queued (the session is over). */
  clear(): void {
    this.queue = [];
    this.queuedBytes = 0;
  }

  /** What queues while a write is in flight goes as one write. */
  private async pump(stream: MeshStream): Promise<void> {
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.length === 1 ? this.queue[0]! : concat(this.queue);
        this.clear();
        await stream.write(batch);
      }
    } catch (err) {
      this.onError(err);
    } finally {
      this.writing = null;
    }
  }
}

function concat(parts: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
