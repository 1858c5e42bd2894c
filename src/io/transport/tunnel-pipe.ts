// One tunnel: a TCP socket joined to a mesh stream, both directions, with the codec, the RPC batching and the
// backpressure of the hot path (tunnel.ts explains why each matters).
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { TunnelKind } from '../../machines/tunnel-policy.ts';
import { RPC_HOLD_MS, RpcBoundaryScanner } from './rpc-boundary.ts';
import { FrameDecoder, FrameEncoder, TUNNEL_TCP_FAILED, TunnelProtocolError, type TunnelCodec } from './tunnel-codec.ts';
import { ConnectionClosedError, firstLine, shortId, type MeshStream } from './transport.ts';

/** Counters shared by a service's pipes (plain increments on the hot path). */
export interface Counters {
  quicWrites: number;
  quicBytesOut: number;
  tcpBytesIn: number;
  quicReads: number;
}

/** One socket joined to one stream; ends when both directions have ended or either side failed. */
export class Pipe {
  private done = false;
  /** The local TCP peer half-closed: finish the stream once its bytes are out. */
  private tcpEnded = false;
  private finishSent = false;
  /** The stream ended (peer finished): the socket was ended. */
  private quicEnded = false;
  /** TCP bytes waiting for the QUIC write in flight. */
  private queue: Buffer[] = [];
  private queued = 0;
  private writing = false;
  private paused = false;
  private encoder: FrameEncoder | undefined;
  private decoder: FrameDecoder | undefined;
  /** rpc kind: where messages end, so that their pieces leave together (null: send every chunk at once). */
  private readonly scanner: RpcBoundaryScanner | null;
  /** Queued bytes include the end of a message someone waits for: send them as soon as we can. */
  private urgent = false;
  private holdTimer: NodeJS.Timeout | undefined;
  /** Bytes from the local socket towards the peer, and from the peer to the local socket. */
  readonly bytes = { bytesOut: 0, bytesIn: 0 };
  /** `opened`: our local client's connection; `accepted`: a peer's stream to our local target. */
  readonly side: 'opened' | 'accepted';
  /** Set when the pipe ended because the QUIC connection under it was lost (not a reset, not an application close). */
  connectionLost: string | null = null;

  /**
   * `side` `opened`: our local client's connection (we wrote the stream's header); `accepted`: a peer's stream
   * whose header (tunnel-codec.ts) the service has read, `first` being whatever came after it in that read.
   */
  constructor(
    readonly peer: EndpointId,
    readonly kind: TunnelKind,
    private readonly socket: Socket,
    private readonly stream: MeshStream,
    side: 'opened' | 'accepted',
    codec: TunnelCodec,
    private readonly highWater: number,
    private readonly log: Logger,
    private readonly counters: Counters,
    private readonly onEnd: (p: Pipe) => void,
    batchRpc: boolean,
    first: Uint8Array | null = null,
  ) {
    this.side = side;
    if (codec === 'deflate') {
      this.encoder = new FrameEncoder();
      this.decoder = new FrameDecoder();
    }
    // The opener's TCP peer is llama-server (requests); the acceptor's is the rpc-server (replies).
    this.scanner = kind === 'rpc' && batchRpc ? new RpcBoundaryScanner(side === 'opened' ? 'requests' : 'replies') : null;
    socket.setNoDelay(true);
    socket.on('data', (b: Buffer) => this.fromTcp(b));
    socket.on('end', () => {
      this.tcpEnded = true;
      this.flush();
    });
    socket.on('error', (err) => this.fail(`tcp: ${err.message}`, TUNNEL_TCP_FAILED));
    socket.on('close', () => {
      // A close before both sides ended in order is an abort: the peer learns it by a reset.
      if (!(this.tcpEnded && this.quicEnded)) this.fail('tcp closed', TUNNEL_TCP_FAILED);
    });
    void this.fromQuic(first);
  }

  private fromTcp(b: Buffer): void {
    this.counters.tcpBytesIn += b.length;
    this.bytes.bytesOut += b.length;
    this.queue.push(b);
    this.queued += b.length;
    if (this.queued >= this.highWater && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    if (this.scanner === null || this.scanner.scan(b) || this.queued >= this.highWater / 4) this.urgent = true;
    else if (this.holdTimer === undefined) {
      // Bytes nobody waits for yet: a short hold, so the command that needs a reply joins them.
      this.holdTimer = setTimeout(() => {
        this.holdTimer = undefined;
        this.urgent = true;
        this.flush();
      }, RPC_HOLD_MS);
    }
    this.flush();
  }

  /** Sends what TCP gave us; whatever arrives meanwhile goes in the next write, joined into one. */
  private flush(): void {
    if (this.writing || this.done) return;
    if (this.queued > 0 && (this.urgent || this.tcpEnded)) {
      this.urgent = false;
      clearTimeout(this.holdTimer);
      this.holdTimer = undefined;
      const joined = this.queue.length === 1 ? this.queue[0]! : Buffer.concat(this.queue, this.queued);
      this.queue = [];
      this.queued = 0;
      this.writing = true;
      const out = this.encoder ? this.encoder.encode(joined) : joined;
      this.counters.quicWrites++;
      this.counters.quicBytesOut += out.length;
      this.stream.write(out).then(
        () => {
          this.writing = false;
          if (this.paused && !this.done) {
            this.paused = false;
            this.socket.resume();
          }
          this.flush();
        },
        (err: unknown) => {
          this.noteConnectionLost(err);
          this.fail(`quic write: ${firstLine(err)}`, TUNNEL_TCP_FAILED);
        },
      );
      return;
    }
    if (this.tcpEnded && !this.finishSent && this.queued === 0) {
      this.finishSent = true;
      this.writing = true;
      this.stream.finish().then(
        () => {
          this.writing = false;
          this.maybeDone();
        },
        (err: unknown) => this.fail(`quic finish: ${firstLine(err)}`, TUNNEL_TCP_FAILED),
      );
    }
  }

  private async fromQuic(first: Uint8Array | null): Promise<void> {
    // The next read is in flight while the socket takes the current chunk: one less wait per message.
    let next = this.stream.read();
    next.catch(() => {});
    try {
      if (first !== null && first.length > 0) await this.toTcp(first);
      for (;;) {
        const chunk = await next;
        if (chunk === null) break;
        this.counters.quicReads++;
        next = this.stream.read();
        next.catch(() => {});
        if (this.done) return;
        await this.toTcp(chunk);
      }
      if (this.decoder?.midFrame) throw new TunnelProtocolError('the stream ended inside a frame');
    } catch (err) {
      if (err instanceof TunnelProtocolError) this.log.warn({ peer: shortId(this.peer), kind: this.kind, err: err.message }, 'bad tunnel stream');
      this.noteConnectionLost(err);
      this.fail(`quic read: ${firstLine(err)}`, TUNNEL_TCP_FAILED);
      return;
    }
    if (this.done) return;
    this.quicEnded = true;
    this.socket.end();
    this.maybeDone();
  }

  /** One chunk from the stream to the socket, through the codec; waits for `drain` when the socket is full. */
  private async toTcp(chunk: Uint8Array): Promise<void> {
    if (this.decoder) {
      for (const part of this.decoder.push(chunk)) {
        this.bytes.bytesIn += part.length;
        if (!this.socket.write(part)) await this.drained();
      }
    } else if ((this.bytes.bytesIn += chunk.length) && !this.socket.write(chunk)) {
      await this.drained();
    }
  }

  private drained(): Promise<void> {
    return new Promise<void>((resolve) => {
      const go = (): void => {
        this.socket.off('drain', go);
        this.socket.off('close', go);
        resolve();
      };
      this.socket.on('drain', go);
      this.socket.on('close', go);
    });
  }

  private maybeDone(): void {
    if (this.done || !this.quicEnded || !this.finishSent || this.writing) return;
    this.done = true;
    this.socket.destroySoon();
    this.onEnd(this);
  }

  /**
   * Only a connection *lost* (CloseInfo code -1: idle timeout, transport failure) is evidence about the peer; an
   * application close (leaving, a duplicate, a connection replaced by the peer's newer one) has its own events.
   */
  private noteConnectionLost(err: unknown): void {
    if (!this.done && err instanceof ConnectionClosedError && err.info.code === -1) this.connectionLost = firstLine(err);
  }

  /** Aborts both sides at once; idempotent. */
  fail(why: string, code: number): void {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.holdTimer);
    this.log.debug({ peer: shortId(this.peer), kind: this.kind, why }, 'tunnel closed');
    this.stream.reset(code);
    this.socket.destroy();
    this.queue = [];
    this.onEnd(this);
  }
}
