// One connection of a MeshEndpoint over a backend's raw connection: it reads each incoming stream's kind byte
// and hands the stream to the endpoint's handler for that kind, once the connection is the pair's one.
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import {
  CLOSE_CODES,
  ConnectionClosedError,
  RESET_CODES,
  STREAM_KIND_BYTES,
  TransportError,
  shortId,
  streamKindOf,
  type CloseInfo,
  type MeshConnection,
  type MeshStream,
  type RawConnection,
  type RawStream,
  type StreamHandler,
  type StreamKind,
} from './transport.ts';

/**
 * Transport-internal kind 0x00. From the acceptor: the verdict, "this connection is the one we keep" (see
 * dial()). From the dialer: a liveness probe, answered by a reset (see probeThenDecide()).
 */
export const KIND_VERDICT = 0x00;

/** What a connection needs of its endpoint (mesh-endpoint.ts). */
export interface ConnectionOwner {
  readonly handlers: ReadonlyMap<StreamKind, StreamHandler>;
  readonly log: Logger;
  readonly kindTimeoutMs: number;
}

class StreamImpl implements MeshStream {
  private head: Uint8Array | null;
  constructor(
    readonly kind: StreamKind,
    readonly remoteId: EndpointId,
    private readonly raw: RawStream,
    head: Uint8Array | null,
  ) {
    this.head = head !== null && head.length > 0 ? head : null;
  }
  write(chunk: Uint8Array): Promise<void> {
    return this.raw.write(chunk);
  }
  read(): Promise<Uint8Array | null> {
    // The first read after the kind byte may have brought payload with it.
    if (this.head !== null) {
      const h = this.head;
      this.head = null;
      return Promise.resolve(h);
    }
    return this.raw.read();
  }
  finish(): Promise<void> {
    return this.raw.finish();
  }
  reset(code: number = RESET_CODES.cancelled): void {
    this.raw.reset(code);
  }
}

export class ConnectionImpl implements MeshConnection {
  readonly closed: Promise<CloseInfo>;
  isClosed = false;
  /** Streams are handed to handlers only once the connection is the pair's connection. */
  private exposed = false;
  private early: (() => void)[] = [];
  /** Resolved by the acceptor's verdict stream (dialer side only). */
  verdict: Promise<void>;
  private resolveVerdict!: () => void;

  constructor(
    readonly raw: RawConnection,
    readonly dialer: 'local' | 'remote',
    private readonly ep: ConnectionOwner,
  ) {
    this.verdict = new Promise((r) => (this.resolveVerdict = r));
    this.closed = raw.closed.then((info) => {
      this.isClosed = true;
      return info;
    });
    void this.acceptLoop();
  }

  get remoteId(): EndpointId {
    return this.raw.remoteId;
  }

  isDirect(): boolean {
    return this.raw.isDirect();
  }

  expose(): void {
    this.exposed = true;
    for (const f of this.early.splice(0)) f();
  }

  async openStream(kind: StreamKind): Promise<MeshStream> {
    if (this.isClosed) throw new ConnectionClosedError(await this.closed);
    const raw = await this.raw.openBi();
    await raw.write(Uint8Array.of(STREAM_KIND_BYTES[kind]));
    return new StreamImpl(kind, this.remoteId, raw, null);
  }

  close(reason: string): void {
    this.raw.close(CLOSE_CODES.normal, reason);
  }

  private async acceptLoop(): Promise<void> {
    for (;;) {
      let raw: RawStream | null;
      try {
        raw = await this.raw.acceptBi();
      } catch {
        raw = null;
      }
      if (raw === null) return;
      void this.classify(raw);
    }
  }

  /** Reads the kind byte, then dispatches; a bad stream is reset and the connection stays. */
  private async classify(raw: RawStream): Promise<void> {
    let first: Uint8Array | null;
    let timer: NodeJS.Timeout | undefined;
    try {
      first = await Promise.race([
        raw.read(),
        new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), this.ep.kindTimeoutMs))),
      ]).then((v) => {
        if (v === 'timeout') throw new TransportError('no kind byte');
        return v;
      });
    } catch (err) {
      raw.reset(RESET_CODES.noKind);
      this.ep.log.debug({ peer: shortId(this.remoteId), err: String(err) }, 'incoming stream ended before its kind byte');
      return;
    } finally {
      clearTimeout(timer);
    }
    if (first === null || first.length === 0) {
      raw.reset(RESET_CODES.noKind);
      return;
    }
    const byte = first[0]!;
    if (byte === KIND_VERDICT) {
      if (this.dialer === 'local') this.resolveVerdict();
      // As the acceptor, 0x00 is the dialer's liveness probe: any answer proves we are alive.
      raw.reset(RESET_CODES.cancelled);
      return;
    }
    const kind = streamKindOf(byte);
    const dispatch = (): void => {
      const handler = kind === undefined ? undefined : this.ep.handlers.get(kind);
      if (kind === undefined || handler === undefined) {
        this.ep.log.warn(
          { peer: shortId(this.remoteId), kind: `0x${byte.toString(16).padStart(2, '0')}` },
          'reset an incoming stream of an unknown or unhandled kind',
        );
        raw.reset(RESET_CODES.unknownKind);
        return;
      }
      const stream = new StreamImpl(kind, this.remoteId, raw, first!.subarray(1));
      try {
        handler(stream, this);
      } catch (err) {
        this.ep.log.error({ peer: shortId(this.remoteId), kind, err: String(err) }, 'stream handler threw; stream reset');
        stream.reset();
      }
    };
    if (this.exposed) dispatch();
    else this.early.push(dispatch);
  }
}

