// One connection of a MeshEndpoint over a backend's raw connection: it reads each incoming stream's kind byte
// and hands the stream to the endpoint's handler for that kind, once the connection is the pair's one and,
// for every kind but `control` (which carries the hello), once the mesh admitted it. A stream that arrives
// before the verdict waits for it, bounded in time and number, then is handed over or reset.
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import {
  CLOSE_CODES,
  ConnectionClosedError,
  RESET_CODES,
  STREAM_KIND_BYTES,
  type RateLimitedLog,
  TransportError,
  shortId,
  streamKindOf,
  type CloseInfo,
  type MeshConnection,
  type MeshEndpointInit,
  type MeshStream,
  type RawConnection,
  type RawStream,
  type StreamHandler,
  type StreamKind,
  type ConnectionPath,
} from './transport.ts';

/**
 * Transport-internal kind 0x00. From the acceptor: the verdict, "this connection is the one we keep" (see
 * dial()). From the dialer: a liveness probe, answered by a reset (see probeThenDecide()).
 */
export const KIND_VERDICT = 0x00;

/** How every connection of an endpoint treats its streams before and around admission (MeshEndpointInit's). */
export interface ConnectionSettings {
  readonly kindTimeoutMs: number;
  readonly admissionRequired: boolean;
  readonly admissionWaitMs: number;
  readonly admissionTimeoutMs: number;
  readonly maxEarlyStreams: number;
}

/** The connection settings of `init`, with their defaults (documented on MeshEndpointInit). */
export function connectionSettings(init: MeshEndpointInit): ConnectionSettings {
  return {
    kindTimeoutMs: init.kindTimeoutMs ?? 10_000,
    admissionRequired: (init.admission ?? 'required') === 'required',
    admissionWaitMs: init.admissionWaitMs ?? 5_000,
    admissionTimeoutMs: init.admissionTimeoutMs ?? 10_000,
    maxEarlyStreams: init.maxEarlyStreams ?? 16,
  };
}

/** What a connection needs of its endpoint (mesh-endpoint.ts). */
export interface ConnectionOwner {
  readonly handlers: ReadonlyMap<StreamKind, StreamHandler>;
  readonly log: Logger;
  /** For lines a stranger can trigger at will. */
  readonly limited: RateLimitedLog;
  readonly settings: ConnectionSettings;
  /** Called once when the connection is admitted or closes, whichever first (frees its handshake slot). */
  settled(conn: ConnectionImpl): void;
}

/** A stream whose kind is known, waiting to be handed to its handler. */
interface Held {
  /** Control (the hello's stream) or an unknown kind (reset by dispatch): goes before the verdict. */
  readonly early: boolean;
  readonly raw: RawStream;
  readonly dispatch: () => void;
  timer: NodeJS.Timeout | undefined;
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
  /** The mesh's verdict; without admission required, admitted from the start. */
  private verdictState: 'pending' | 'admitted' | 'refused';
  private refusal = '';
  /** Streams with a known kind that wait for exposure or for the verdict. */
  private held: Held[] = [];
  /** Incoming streams of this connection, before its admission, that are being classified or held. */
  private early = 0;
  private admissionTimer: NodeJS.Timeout | undefined;
  private settledOnce = false;
  /** Resolved by the acceptor's verdict stream (dialer side only). */
  verdict: Promise<void>;
  private resolveVerdict!: () => void;

  constructor(
    readonly raw: RawConnection,
    readonly dialer: 'local' | 'remote',
    private readonly ep: ConnectionOwner,
  ) {
    this.verdict = new Promise((r) => (this.resolveVerdict = r));
    this.verdictState = ep.settings.admissionRequired ? 'pending' : 'admitted';
    this.closed = raw.closed.then((info) => {
      this.isClosed = true;
      clearTimeout(this.admissionTimer);
      this.dropHeld(RESET_CODES.notAdmitted);
      this.settle();
      return info;
    });
    if (this.verdictState === 'pending') {
      this.admissionTimer = setTimeout(() => {
        if (this.verdictState !== 'pending' || this.isClosed) return;
        this.ep.limited.warn(
          'not-admitted-in-time',
          { peer: shortId(this.remoteId), ms: this.ep.settings.admissionTimeoutMs },
          'closing a connection that was not admitted in time',
        );
        this.raw.close(CLOSE_CODES.notAdmitted, 'not admitted in time');
      }, this.ep.settings.admissionTimeoutMs);
      this.admissionTimer.unref?.();
    } else {
      this.settle();
    }
    void this.acceptLoop();
  }

  get remoteId(): EndpointId {
    return this.raw.remoteId;
  }

  get admitted(): boolean {
    return this.verdictState === 'admitted';
  }

  isDirect(): boolean {
    return this.raw.isDirect();
  }

  paths(): ConnectionPath[] {
    return this.raw.paths?.() ?? [];
  }

  expose(): void {
    this.exposed = true;
    this.release();
  }

  /** The mesh admitted the connection: hand over what waits. */
  admit(): void {
    if (this.verdictState !== 'pending') return;
    this.verdictState = 'admitted';
    clearTimeout(this.admissionTimer);
    this.early = 0;
    this.settle();
    this.release();
  }

  /** The mesh refused the connection: reset what waits and what comes, but control. */
  refuse(reason: string): void {
    if (this.verdictState !== 'pending') return;
    this.verdictState = 'refused';
    this.refusal = reason;
    clearTimeout(this.admissionTimer);
    const dropped = this.dropHeld(RESET_CODES.notAdmitted, (h) => !h.early);
    if (dropped > 0) {
      this.ep.limited.warn('refused-streams', { peer: shortId(this.remoteId), streams: dropped, reason }, 'reset the waiting streams of a refused connection');
    }
  }

  private settle(): void {
    if (this.settledOnce) return;
    this.settledOnce = true;
    this.ep.settled(this);
  }

  /** Hands over every held stream that may go now. */
  private release(): void {
    if (!this.exposed) return;
    const go = this.held.filter((h) => h.early || this.verdictState === 'admitted');
    if (go.length === 0) return;
    this.held = this.held.filter((h) => !go.includes(h));
    for (const h of go) {
      clearTimeout(h.timer);
      if (this.verdictState !== 'admitted') this.early--;
      h.dispatch();
    }
  }

  private dropHeld(code: number, which: (h: Held) => boolean = () => true): number {
    const drop = this.held.filter(which);
    this.held = this.held.filter((h) => !drop.includes(h));
    for (const h of drop) {
      clearTimeout(h.timer);
      if (this.verdictState !== 'admitted') this.early--;
      h.raw.reset(code);
    }
    return drop.length;
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
      if (this.verdictState !== 'admitted') {
        // Before the verdict a peer gets a few streams (the control stream among them), no more.
        if (this.early >= this.ep.settings.maxEarlyStreams) {
          raw.reset(RESET_CODES.notAdmitted);
          this.ep.limited.warn(
            'early-streams',
            { peer: shortId(this.remoteId), max: this.ep.settings.maxEarlyStreams },
            'reset a stream of a connection not admitted yet: too many streams wait for its verdict',
          );
          continue;
        }
        this.early++;
        void this.classify(raw, true);
      } else {
        void this.classify(raw, false);
      }
    }
  }

  /** Reads the kind byte, then dispatches; a bad stream is reset and the connection stays. */
  private async classify(raw: RawStream, counted: boolean): Promise<void> {
    const uncount = (): void => {
      if (counted && this.verdictState !== 'admitted') this.early--;
    };
    let first: Uint8Array | null;
    let timer: NodeJS.Timeout | undefined;
    try {
      first = await Promise.race([
        raw.read(),
        new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), this.ep.settings.kindTimeoutMs))),
      ]).then((v) => {
        if (v === 'timeout') throw new TransportError('no kind byte');
        return v;
      });
    } catch (err) {
      uncount();
      raw.reset(RESET_CODES.noKind);
      this.ep.log.debug({ peer: shortId(this.remoteId), err: String(err) }, 'incoming stream ended before its kind byte');
      return;
    } finally {
      clearTimeout(timer);
    }
    if (first === null || first.length === 0) {
      uncount();
      raw.reset(RESET_CODES.noKind);
      return;
    }
    const byte = first[0]!;
    if (byte === KIND_VERDICT) {
      uncount();
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
    if (this.isClosed) {
      uncount();
      raw.reset(RESET_CODES.notAdmitted);
      return;
    }
    const label = kind ?? `0x${byte.toString(16).padStart(2, '0')}`;
    const early = kind === undefined || kind === 'control';
    if (!early && this.verdictState === 'refused') {
      uncount();
      this.ep.limited.warn(
        'refused-stream',
        { peer: shortId(this.remoteId), kind: label, reason: this.refusal },
        'reset a stream of a refused connection: its peer is not admitted',
      );
      raw.reset(RESET_CODES.notAdmitted);
      return;
    }
    if (this.exposed && (early || this.verdictState === 'admitted')) {
      uncount();
      dispatch();
      return;
    }
    const held: Held = { early, raw, dispatch, timer: undefined };
    if (!early && this.verdictState === 'pending') {
      // Wait for the verdict (the peer may have admitted us before we admit it), bounded.
      held.timer = setTimeout(() => {
        if (!this.held.includes(held)) return;
        this.held = this.held.filter((h) => h !== held);
        uncount();
        raw.reset(RESET_CODES.notAdmitted);
        this.ep.limited.warn(
          'stream-not-admitted',
          { peer: shortId(this.remoteId), kind: label, ms: this.ep.settings.admissionWaitMs },
          'reset a stream of a connection not admitted in time: its peer is not admitted',
        );
      }, this.ep.settings.admissionWaitMs);
    }
    this.held.push(held);
  }
}
