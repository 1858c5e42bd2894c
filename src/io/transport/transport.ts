// The mesh's transport contract (endpoint, connection, typed byte stream) and the logic both transports share:
// one connection per pair of peers, stream kinds by first byte, handler dispatch. Backends supply raw QUIC-like
// pieces (RawEndpoint); iroh-transport.ts and memory-transport.ts are the two backends.
import { pino, type Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { asEndpointId } from '../../machines/mesh-types.ts';

/** The one ALPN this protocol speaks; a peer on another version fails at the QUIC handshake. */
export const MESH_ALPN = 'mesh-inference/1';

/** Every bi stream opens with one byte naming what it carries (ARCHITECTURE.md, "The protocol"). */
export const STREAM_KIND_BYTES = {
  control: 0x01,
  rpc: 0x02,
  http: 0x03,
  reserved: 0x04,
} as const;

export type StreamKind = keyof typeof STREAM_KIND_BYTES;

/**
 * Transport-internal kind 0x00. From the acceptor: the verdict, "this connection is the one we keep" (see
 * dial()). From the dialer: a liveness probe, answered by a reset (see probeThenDecide()).
 */
const KIND_VERDICT = 0x00;

const KIND_BY_BYTE: ReadonlyMap<number, StreamKind> = new Map(
  (Object.entries(STREAM_KIND_BYTES) as [StreamKind, number][]).map(([k, b]) => [b, k]),
);

export function streamKindOf(byte: number): StreamKind | undefined {
  return KIND_BY_BYTE.get(byte);
}

/** Application close codes on the wire (QUIC CONNECTION_CLOSE error codes). */
export const CLOSE_CODES = {
  normal: 0,
  /** Both peers dialed at once; this one loses under the fixed rule. */
  duplicate: 1,
  /** A newer connection from the same peer took over (the peer restarted or lost this one). */
  replaced: 2,
  endpointClosing: 3,
} as const;

/** Stream reset / stop codes. */
export const RESET_CODES = {
  /** The application reset the stream (MeshStream.reset without a code). */
  cancelled: 0,
  /** The opener named a stream kind nobody here handles. */
  unknownKind: 1,
  /** The opener never sent its kind byte in time. */
  noKind: 2,
} as const;

// ---------------------------------------------------------------------------------------------------------
// Errors

export class TransportError extends Error {
  override name = 'TransportError';
}

/** A dial failed: timed out, aborted, refused by the handshake, or the peer was unreachable. */
export class DialError extends TransportError {
  override name = 'DialError';
  constructor(
    readonly peer: EndpointId,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`dial ${shortId(peer)}: ${message}`, options);
  }
}

/** The other side reset (or stopped reading) the stream. */
export class StreamResetError extends TransportError {
  override name = 'StreamResetError';
  constructor(readonly code: number) {
    super(`stream reset by peer (code ${code})`);
  }
}

/** The connection under the stream is gone. */
export class ConnectionClosedError extends TransportError {
  override name = 'ConnectionClosedError';
  constructor(readonly info: CloseInfo) {
    super(`connection closed: ${info.reason}`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The contract

export interface CloseInfo {
  /** Human-readable reason: the peer's close reason, ours, or what the transport saw ("timed out"). */
  readonly reason: string;
  /** Our CLOSE_CODES when the close was an application close; -1 for transport-level ends (idle timeout). */
  readonly code: number;
  /** True when the peer closed it (gracefully or by timeout on its side); false when we did. */
  readonly byPeer: boolean;
}

/**
 * A byte duplex. Writes are ordered; await each write before the next one: that await is the backpressure.
 * Chunks written may be cut or joined differently on the other side (it is a byte stream, not messages).
 */
export interface MeshStream {
  readonly kind: StreamKind;
  /** Which peer is on the other end. */
  readonly remoteId: EndpointId;
  /** Resolves once the transport has taken the bytes (not once delivered). The caller may reuse `chunk`. */
  write(chunk: Uint8Array): Promise<void>;
  /** The next bytes, or null once the peer finished its side. Rejects with StreamResetError / ConnectionClosedError. */
  read(): Promise<Uint8Array | null>;
  /** No more writes from us; the peer's read() returns null after what we wrote. Await the last write first. */
  finish(): Promise<void>;
  /** Abort both directions at once: the peer's read and write reject with StreamResetError. Never throws. */
  reset(code?: number): void;
}

export interface MeshConnection {
  readonly remoteId: EndpointId;
  /** Whether we dialed it ('local') or the peer did ('remote'). */
  readonly dialer: 'local' | 'remote';
  /** Resolves (never rejects) once the connection is closed, by either side or by a timeout. */
  readonly closed: Promise<CloseInfo>;
  readonly isClosed: boolean;
  /**
   * Whether the path in use right now is a direct UDP path (true) or goes through a relay (false).
   * Polled on each call (iroh's watch* methods abort the process). Relayed peers are too slow for
   * inference: a lite client at most, never a worker.
   */
  isDirect(): boolean;
  /** Opens a bi stream and sends its kind byte; the peer's handler for that kind receives it. */
  openStream(kind: StreamKind): Promise<MeshStream>;
  /** Graceful close with a reason the peer sees (the tail of unflushed writes can be lost, as in QUIC). */
  close(reason: string): void;
}

export interface DialOptions {
  readonly signal?: AbortSignal;
  /** Default 10 s. iroh alone would wait 30 s for a dead address. */
  readonly timeoutMs?: number;
}

/** Receives every incoming stream of one kind. Must not throw; errors of its own are its business. */
export type StreamHandler = (stream: MeshStream, connection: MeshConnection) => void;

export interface MeshEndpoint {
  readonly id: EndpointId;
  /** Where peers can dial us: "ip:port" (and a relay URL when relays are on). */
  addrs(): string[];
  /**
   * The connection to `id`, dialing it if there is none. Joins a dial in flight to the same peer.
   * Exactly one connection per pair survives simultaneous dials, and it is the one this resolves with.
   */
  dial(id: EndpointId, addrs: readonly string[], options?: DialOptions): Promise<MeshConnection>;
  /**
   * The next connection that a peer opened to us (null once the endpoint is closed). Every connection is
   * delivered exactly once: to the dial() that was waiting for that peer, or else here.
   */
  accept(): Promise<MeshConnection | null>;
  /** The live connection to a peer, if any. */
  connection(id: EndpointId): MeshConnection | undefined;
  connections(): MeshConnection[];
  /** Route incoming streams of `kind` to `handler` (one handler per kind). Unhandled kinds are reset. */
  handle(kind: StreamKind, handler: StreamHandler): void;
  unhandle(kind: StreamKind): void;
  /** Closes every connection (peers see it at once) and the endpoint. Idempotent. */
  close(): Promise<void>;
  readonly isClosed: boolean;
}

// ---------------------------------------------------------------------------------------------------------
// What a backend provides: QUIC-shaped pieces with Uint8Array bytes, no policy.

export interface RawStream {
  write(chunk: Uint8Array): Promise<void>;
  /** null at the end of the stream; rejects StreamResetError / ConnectionClosedError. */
  read(): Promise<Uint8Array | null>;
  finish(): Promise<void>;
  /** Reset our sending side and stop reading theirs. Never throws. */
  reset(code: number): void;
}

export interface RawConnection {
  readonly remoteId: EndpointId;
  openBi(): Promise<RawStream>;
  /** null once the connection is closed. */
  acceptBi(): Promise<RawStream | null>;
  close(code: number, reason: string): void;
  readonly closed: Promise<CloseInfo>;
  isDirect(): boolean;
}

export interface RawEndpoint {
  readonly id: EndpointId;
  addrs(): string[];
  /** Must honour `signal` (reject with DialError) and close a connection that completes after it fired. */
  dial(id: EndpointId, addrs: readonly string[], signal: AbortSignal): Promise<RawConnection>;
  /** The next incoming connection with its handshake done; null once closed. */
  acceptNext(): Promise<RawConnection | null>;
  close(): Promise<void>;
}

export interface MeshEndpointComponents {
  readonly log?: Logger;
}

export interface MeshEndpointInit {
  /** How long an opened stream may take to send its kind byte before we reset it. Default 10 s. */
  readonly kindTimeoutMs?: number;
  /** How long a connection may take to answer a liveness probe before it counts as dead. Default 1 s. */
  readonly probeTimeoutMs?: number;
  readonly defaultDialTimeoutMs?: number;
}

// ---------------------------------------------------------------------------------------------------------
// The shared logic

export function shortId(id: string): string {
  return id.slice(0, 10);
}

/**
 * The fixed rule for simultaneous dials, in one place. `incoming` arrived from `remote`; `self` may hold a
 * dial in flight to `remote` or a live connection. Returns whether the acceptor keeps the incoming one.
 *
 * Keep the connection dialed by the smaller endpoint id. The acceptor decides about each incoming
 * connection and tells the dialer (a verdict stream, or a close with CLOSE_CODES.duplicate), so both
 * sides always agree: a dialer never exposes its connection before the verdict.
 *  - The remote is the smaller id: its connections always win; any other one we hold is replaced.
 *  - The remote is the larger id: refuse it while we have our own dial to it in flight or alive (ours
 *    wins); otherwise the peer has lost what we had (restart), so the newer one replaces the old.
 * "Alive" is checked by EndpointCore.probeThenDecide when this says no because of a connection we hold.
 */
export function keepIncoming(self: EndpointId, remote: EndpointId, weAreDialing: boolean, weHoldOwnDial: boolean): boolean {
  if (remote < self) return true;
  return !(weAreDialing || weHoldOwnDial);
}

interface PendingDial {
  readonly promise: Promise<MeshConnection>;
  /** Called when an incoming connection from the same peer won and was exposed. */
  adopt(conn: ConnectionImpl): void;
}

/** An unbounded queue with async take(); null once ended and empty. */
export class Queue<T> {
  private items: T[] = [];
  private takers: ((v: T | null) => void)[] = [];
  private ended = false;
  push(v: T): void {
    const t = this.takers.shift();
    if (t) t(v);
    else this.items.push(v);
  }
  take(): Promise<T | null> {
    if (this.items.length > 0) return Promise.resolve(this.items.shift()!);
    if (this.ended) return Promise.resolve(null);
    return new Promise((resolve) => this.takers.push(resolve));
  }
  end(): void {
    this.ended = true;
    for (const t of this.takers.splice(0)) t(null);
  }
  drain(): T[] {
    return this.items.splice(0);
  }
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

class ConnectionImpl implements MeshConnection {
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
    private readonly ep: EndpointCore,
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

/** The MeshEndpoint over any RawEndpoint: connection table, dial/accept with the fixed rule, stream dispatch. */
class EndpointCore implements MeshEndpoint {
  readonly handlers = new Map<StreamKind, StreamHandler>();
  readonly log: Logger;
  readonly kindTimeoutMs: number;
  private readonly probeTimeoutMs: number;
  private readonly defaultDialTimeoutMs: number;
  private readonly current = new Map<EndpointId, ConnectionImpl>();
  private readonly pending = new Map<EndpointId, PendingDial>();
  /** Every raw connection we hold, exposed or not, so close() reaches all of them (and GC reaches none). */
  private readonly all = new Set<ConnectionImpl>();
  private readonly incoming = new Queue<MeshConnection>();
  isClosed = false;

  constructor(
    private readonly raw: RawEndpoint,
    init: MeshEndpointInit,
    components: MeshEndpointComponents,
  ) {
    this.log = components.log ?? pino({ level: 'silent' });
    this.kindTimeoutMs = init.kindTimeoutMs ?? 10_000;
    this.probeTimeoutMs = init.probeTimeoutMs ?? 1_000;
    this.defaultDialTimeoutMs = init.defaultDialTimeoutMs ?? 10_000;
    void this.acceptLoop();
  }

  get id(): EndpointId {
    return this.raw.id;
  }

  addrs(): string[] {
    return this.raw.addrs();
  }

  handle(kind: StreamKind, handler: StreamHandler): void {
    if (this.handlers.has(kind)) throw new TransportError(`a handler for ${kind} streams is already registered`);
    this.handlers.set(kind, handler);
  }

  unhandle(kind: StreamKind): void {
    this.handlers.delete(kind);
  }

  connection(id: EndpointId): MeshConnection | undefined {
    const c = this.current.get(id);
    return c && !c.isClosed ? c : undefined;
  }

  connections(): MeshConnection[] {
    return [...this.current.values()].filter((c) => !c.isClosed);
  }

  accept(): Promise<MeshConnection | null> {
    return this.incoming.take();
  }

  dial(id: EndpointId, addrs: readonly string[], options: DialOptions = {}): Promise<MeshConnection> {
    id = asEndpointId(id);
    if (this.isClosed) return Promise.reject(new DialError(id, 'the endpoint is closed'));
    if (id === this.id) return Promise.reject(new DialError(id, 'cannot dial ourselves'));
    const existing = this.connection(id);
    if (existing) return Promise.resolve(existing);
    const timeoutMs = options.timeoutMs ?? this.defaultDialTimeoutMs;
    let p = this.pending.get(id);
    if (!p) {
      p = this.startDial(id, addrs, timeoutMs);
      this.pending.set(id, p);
      const mine = p;
      const clear = (): void => {
        if (this.pending.get(id) === mine) this.pending.delete(id);
      };
      p.promise.then(clear, clear);
    }
    // A joiner's own signal ends only its own wait.
    const signal = options.signal;
    if (!signal) return p.promise;
    if (signal.aborted) return Promise.reject(new DialError(id, 'aborted'));
    return new Promise((resolve, reject) => {
      const onAbort = (): void => reject(new DialError(id, 'aborted'));
      signal.addEventListener('abort', onAbort, { once: true });
      p.promise.then(
        (c) => {
          signal.removeEventListener('abort', onAbort);
          resolve(c);
        },
        (e: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(e);
        },
      );
    });
  }

  private startDial(id: EndpointId, addrs: readonly string[], timeoutMs: number): PendingDial {
    let adopt!: (c: ConnectionImpl) => void;
    const adopted = new Promise<ConnectionImpl>((r) => (adopt = r));
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), timeoutMs);
    let own: ConnectionImpl | undefined;
    let winner: MeshConnection | undefined;
    const deadline = new Promise<never>((_, reject) =>
      ctrl.signal.addEventListener('abort', () => reject(new DialError(id, `timed out after ${timeoutMs} ms`)), {
        once: true,
      }),
    );
    deadline.catch(() => {});
    // If an incoming connection from this peer wins meanwhile, it is our answer whatever our own dial does.
    const ownDial = (async (): Promise<MeshConnection> => {
      const raw = await this.raw.dial(id, addrs, ctrl.signal);
      own = this.track(new ConnectionImpl(raw, 'local', this));
      const outcome = await Promise.race([own.verdict.then(() => 'kept' as const), own.closed]);
      if (outcome === 'kept') {
        if (this.isClosed || (winner !== undefined && winner !== own)) {
          raw.close(CLOSE_CODES.duplicate, 'duplicate connection');
          throw new DialError(id, 'superseded');
        }
        this.install(own);
        return own;
      }
      if (outcome.code === CLOSE_CODES.duplicate && outcome.byPeer) {
        // The peer keeps its own dial to us; it arrives through onIncoming and adopt().
        return new Promise<never>(() => {});
      }
      throw new DialError(id, `closed during the handshake: ${outcome.reason}`);
    })();
    ownDial.catch(() => {});
    const promise = (async (): Promise<MeshConnection> => {
      try {
        winner = await Promise.race([ownDial, adopted, deadline]);
        return winner;
      } catch (err) {
        if (own && !own.isClosed) own.raw.close(CLOSE_CODES.normal, 'dial abandoned');
        if (err instanceof DialError) throw err;
        throw new DialError(id, firstLine(err), { cause: err });
      } finally {
        clearTimeout(timer);
        // Tells a raw dial still in progress to close whatever it gets.
        ctrl.abort();
      }
    })();
    return { promise, adopt };
  }

  private track(conn: ConnectionImpl): ConnectionImpl {
    this.all.add(conn);
    void conn.closed.then((info) => {
      this.all.delete(conn);
      if (this.current.get(conn.remoteId) === conn) {
        this.current.delete(conn.remoteId);
        this.log.debug({ peer: shortId(conn.remoteId), reason: info.reason, byPeer: info.byPeer }, 'connection closed');
      }
    });
    return conn;
  }

  /** Makes `conn` the pair's connection, replacing any other. */
  private install(conn: ConnectionImpl): void {
    const old = this.current.get(conn.remoteId);
    if (old && old !== conn) {
      this.log.info({ peer: shortId(conn.remoteId) }, 'a newer connection from this peer replaces the old one');
      old.raw.close(CLOSE_CODES.replaced, 'replaced by a newer connection');
    }
    this.current.set(conn.remoteId, conn);
    conn.expose();
  }

  private async acceptLoop(): Promise<void> {
    for (;;) {
      let raw: RawConnection | null;
      try {
        raw = await this.raw.acceptNext();
      } catch (err) {
        this.log.warn({ err: firstLine(err) }, 'accept failed');
        continue;
      }
      if (raw === null) break;
      if (this.isClosed) {
        raw.close(CLOSE_CODES.endpointClosing, 'endpoint closing');
        continue;
      }
      this.onIncoming(raw);
    }
    this.incoming.end();
  }

  private onIncoming(raw: RawConnection): void {
    const peer = raw.remoteId;
    const cur = this.connection(peer) as ConnectionImpl | undefined;
    const dialing = this.pending.has(peer);
    if (keepIncoming(this.id, peer, dialing, cur?.dialer === 'local')) {
      this.keep(raw);
      return;
    }
    if (!dialing && cur !== undefined) {
      // The larger id dials us although we hold the connection we dialed to it: a dial that crossed ours,
      // or the peer restarted and ours is a zombie that QUIC would keep for ~30 s. A probe tells which.
      void this.probeThenDecide(raw, cur);
      return;
    }
    this.refuse(raw);
  }

  private refuse(raw: RawConnection): void {
    this.log.debug({ peer: shortId(raw.remoteId) }, 'simultaneous dial: refusing the duplicate dialed by the larger id');
    raw.close(CLOSE_CODES.duplicate, 'duplicate connection: the one dialed by the smaller id is kept');
  }

  private keep(raw: RawConnection): void {
    const peer = raw.remoteId;
    const conn = this.track(new ConnectionImpl(raw, 'remote', this));
    // The verdict goes first, so it is the dialer's first stream; it need not be awaited before install.
    void raw
      .openBi()
      .then((s) => s.write(Uint8Array.of(KIND_VERDICT)).then(() => s.finish()))
      .catch((err: unknown) => this.log.debug({ peer: shortId(peer), err: firstLine(err) }, 'verdict not sent'));
    this.install(conn);
    const p = this.pending.get(peer);
    if (p) p.adopt(conn);
    else this.incoming.push(conn);
  }

  private async probeThenDecide(raw: RawConnection, cur: ConnectionImpl): Promise<void> {
    const alive = await this.probe(cur);
    if (this.isClosed) {
      raw.close(CLOSE_CODES.endpointClosing, 'endpoint closing');
      return;
    }
    const now = this.connection(raw.remoteId);
    if (alive && now === cur) {
      this.refuse(raw);
      return;
    }
    if (now === cur) {
      this.log.info({ peer: shortId(raw.remoteId) }, 'the peer dialed again and our connection to it is unresponsive: replacing it');
    }
    this.keep(raw);
  }

  /** Whether `conn` answers a 0x00 stream (with a reset, or anything) within probeTimeoutMs. */
  private async probe(conn: ConnectionImpl): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), this.probeTimeoutMs)));
    const answer = (async (): Promise<boolean> => {
      const s = await conn.raw.openBi();
      await s.write(Uint8Array.of(KIND_VERDICT));
      try {
        await s.read();
        return true;
      } catch (err) {
        return err instanceof StreamResetError;
      }
    })().catch(() => false);
    try {
      return await Promise.race([answer, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const c of this.all) c.raw.close(CLOSE_CODES.endpointClosing, 'endpoint closing');
    for (const c of this.incoming.drain()) c.close('endpoint closing');
    // Let CONNECTION_CLOSE frames leave before the socket goes.
    await Promise.race([Promise.all([...this.all].map((c) => c.closed)), delay(200)]);
    this.incoming.end();
    await this.raw.close();
  }
}

export function createMeshEndpoint(
  raw: RawEndpoint,
  init: MeshEndpointInit = {},
  components: MeshEndpointComponents = {},
): MeshEndpoint {
  return new EndpointCore(raw, init, components);
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers shared by the backends

/** Rust errors from the binding carry a backtrace after the first line; people need the first line. */
export function firstLine(err: unknown): string {
  const s = err instanceof Error ? err.message : String(err);
  const i = s.indexOf('\n');
  return (i < 0 ? s : s.slice(0, i)).trim();
}

export function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}
