// The network's sessions by peer id and how a session ends: writing frames to it, refusing, closing with `leaving`, teardown, and the one report to the node.
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { MeshMessage, NetworkEvent } from '../../machines/protocol.ts';
import type { HelloCheck } from '../wire/mesh-auth.ts';
import { encodeFrame } from '../wire/frame-codec.ts';
import { firstLine, type MeshConnection, type MeshEndpoint } from '../transport/transport.ts';
import type { Session } from './session.ts';

export interface PeerTableLimits {
  /** After `leaving` is written, how long to wait for the peer to hang up before closing ourselves. */
  readonly closeLingerMs: number;
  /** Bytes queued towards one peer beyond which it counts as not reading and is closed. */
  readonly maxQueuedBytes: number;
  /** Frames above this many bytes are not sent (nor accepted). */
  readonly maxFrameBytes: number;
}

export class PeerTable {
  readonly sessions = new Map<EndpointId, Session>();
  /** Connections whose session has ended: never adopted again. */
  readonly retired = new WeakSet<MeshConnection>();
  /** Where events go while the network runs (set by start, emptied by stop). */
  emit: (event: NetworkEvent) => void = () => {};
  running = false;

  constructor(
    private readonly endpoint: MeshEndpoint,
    readonly log: Logger,
    readonly limits: PeerTableLimits,
  ) {}

  peerLog(id: EndpointId): Logger {
    return this.log.child({ peer: short(id) });
  }

  // ---- ending ----

  refuse(s: Session, check: HelloCheck & { readonly ok: false }): void {
    s.log.warn({ code: check.code }, `refusing peer: ${check.reason}`);
    void this.closeSession(s, `refused: ${check.reason}`, `refused: ${check.reason}`);
  }

  /** A protocol violation: tell the peer why (so both logs say it), then close. */
  async fail(s: Session, reason: string): Promise<void> {
    if (s.state !== 'handshaking' && s.state !== 'admitted') return;
    s.log.warn({ reason }, `closing peer: ${reason}`);
    await this.closeSession(s, reason, reason);
  }

  async closeSession(s: Session, eventReason: string, leavingReason: string): Promise<void> {
    if (s.state !== 'handshaking' && s.state !== 'admitted') return;
    if (s.state === 'handshaking') this.endpoint.refuse(s.conn, eventReason);
    s.state = 'closing';
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    // Report at once: the node must not keep sending to a peer on its way out.
    this.report(s, eventReason);
    if (s.stream) {
      const stream = s.stream;
      this.enqueue(s, encodeFrame({ type: 'leaving', reason: leavingReason.slice(0, 500) }), true);
      const linger = this.limits.closeLingerMs;
      await withDeadline(
        (async () => {
          await s.out.drained();
          await stream.finish();
        })(),
        linger,
      );
      // The peer hangs up when it reads `leaving`: wait for that (bounded) so the tail is not cut off.
      await withDeadline(s.conn.closed, linger);
    }
    this.teardown(s, eventReason);
  }

  /** Final cleanup; idempotent. Reports the end to the node if it knew the peer and has not heard yet. */
  teardown(s: Session, reason: string): void {
    if (s.state === 'closed') return;
    if (s.state === 'handshaking') this.endpoint.refuse(s.conn, reason);
    s.state = 'closed';
    s.markDone();
    this.retired.add(s.conn);
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    s.out.clear();
    if (this.sessions.get(s.id) === s) this.sessions.delete(s.id);
    try {
      if (!s.conn.isClosed) s.conn.close(reason.slice(0, 200));
    } catch {
      // already closed
    }
    this.report(s, reason);
  }

  private report(s: Session, reason: string): void {
    if (!s.reported) return;
    s.reported = false;
    if (this.running) this.emit({ type: 'net.peer.disconnected', id: s.id, reason });
  }

  // ---- writing ----

  write(s: Session, message: MeshMessage): void {
    let frame: Uint8Array;
    try {
      frame = encodeFrame(message, { maxFrameBytes: this.limits.maxFrameBytes });
    } catch (err) {
      s.log.error({ err: firstLine(err), type: message.type }, 'message could not be encoded; dropped');
      return;
    }
    this.enqueue(s, frame, false);
  }

  private enqueue(s: Session, frame: Uint8Array, closing: boolean): void {
    if (s.state === 'closed' || (s.state === 'closing' && !closing)) return;
    if (!s.out.push(frame)) void this.fail(s, `peer is not reading: over ${this.limits.maxQueuedBytes} bytes queued`);
  }
}

/** A peer id as logs show it. */
export const short = (id: string): string => id.slice(0, 10);

export function logLeaving(log: Logger, reason: string): void {
  if (reason.startsWith('refused')) log.warn({ reason }, `peer refused the connection: ${reason}`);
  else log.info({ reason }, `peer is leaving: ${reason}`);
}

export async function withDeadline(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p.catch(() => {}), new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}
