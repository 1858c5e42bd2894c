// The mesh's transport contract: endpoint, connection, typed byte stream, their errors and codes, and the
// QUIC-shaped pieces a backend supplies (RawEndpoint). mesh-endpoint.ts builds the one MeshEndpoint over any
// backend; iroh-transport.ts and memory-transport.ts are the two backends.
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { TunnelTarget } from '../../machines/tunnel-policy.ts';

/** The one ALPN this protocol speaks; a peer on another version fails at the QUIC handshake. */
export const MESH_ALPN = 'mesh-inference/1';

/** Every bi stream opens with one byte naming what it carries (ARCHITECTURE.md, "The protocol"). */
export const STREAM_KIND_BYTES = {
  control: 0x01,
  rpc: 0x02,
  http: 0x03,
  reserved: 0x04,
  /** A key for one direct TCP + TLS data connection (direct-offer.ts). */
  direct: 0x05,
} as const;

export type StreamKind = keyof typeof STREAM_KIND_BYTES;

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
  /** Too many connections from this address (or in all) have not been admitted yet. */
  busy: 4,
  /** The connection was not admitted by the mesh in time (admissionTimeoutMs). */
  notAdmitted: 5,
} as const;

/** Stream reset / stop codes. */
export const RESET_CODES = {
  /** The application reset the stream (MeshStream.reset without a code). */
  cancelled: 0,
  /** The opener named a stream kind nobody here handles. */
  unknownKind: 1,
  /** The opener never sent its kind byte in time. */
  noKind: 2,
  /**
   * The stream's connection is not admitted: refused by the mesh, not admitted within admissionWaitMs, or
   * over maxEarlyStreams streams waiting for the verdict.
   */
  notAdmitted: 3,
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
  /**
   * Whether the mesh admitted this connection (MeshEndpoint.admit): only then do its streams of any kind but
   * `control` reach their handlers. Always true with `admission: 'open'`.
   */
  readonly admitted: boolean;
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
  /** The paths QUIC knows to the peer right now, the selected one flagged; [] where the backend has none. */
  paths(): ConnectionPath[];
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
  /**
   * The mesh's verdict on a connection (its hello verified): from now on its streams of every kind reach
   * their handlers, and those that arrived early and still wait are handed over. Idempotent.
   */
  admit(connection: MeshConnection): void;
  /**
   * The mesh's verdict against a connection: its waiting streams are reset at once and so is every later one
   * but `control` (the caller closes the connection itself, after telling the peer why). Idempotent.
   */
  refuse(connection: MeshConnection, reason: string): void;
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

/** One network path of a connection, as QUIC sees it (the WAN lab checks that peers cross its relays). */
export interface ConnectionPath {
  /** "ip:port" of the peer on this path, or the relay's URL. */
  readonly remoteAddr: string;
  readonly selected: boolean;
  readonly relay: boolean;
  /** QUIC's round-trip estimate, whole milliseconds. */
  readonly rttMs: number;
}

export interface RawConnection {
  readonly remoteId: EndpointId;
  openBi(): Promise<RawStream>;
  /** null once the connection is closed. */
  acceptBi(): Promise<RawStream | null>;
  close(code: number, reason: string): void;
  readonly closed: Promise<CloseInfo>;
  isDirect(): boolean;
  /** Polled like isDirect(); a backend without paths leaves it out. */
  paths?(): ConnectionPath[];
  /**
   * Where an incoming connection came from, as the key of the per-address handshake bound: the remote IP
   * (no port), or null when there is none of its own (through a relay): then only the total bound applies.
   */
  readonly remoteAddress?: string | null;
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
  /**
   * `required` (default): nothing but the `control` stream (which carries the hello) reaches a handler until
   * the mesh admits the connection (admit()). `open`: every connection counts as admitted at once, for tests
   * and tools that use the transport without a mesh on top.
   */
  readonly admission?: 'required' | 'open';
  /** How long a stream that arrived before its connection's verdict waits for it before it is reset. Default 5 s. */
  readonly admissionWaitMs?: number;
  /** A connection not admitted by then is closed (CLOSE_CODES.notAdmitted). Default 10 s. */
  readonly admissionTimeoutMs?: number;
  /** Streams of one unadmitted connection that may wait for its verdict (control included); more are reset. Default 16. */
  readonly maxEarlyStreams?: number;
  /** Incoming connections not yet admitted, per remote address; more are closed at once (CLOSE_CODES.busy). Default 16. */
  readonly maxHandshakesPerAddress?: number;
  /** Incoming connections not yet admitted, in all. Default 256. */
  readonly maxHandshakes?: number;
  /** How long a connection may take to answer a liveness probe before it counts as dead. Default 1 s. */
  readonly probeTimeoutMs?: number;
  readonly defaultDialTimeoutMs?: number;
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers shared by the backends and the endpoint

export function shortId(id: string): string {
  return id.slice(0, 10);
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

/** Rust errors from the binding carry a backtrace after the first line; people need the first line. */
export function firstLine(err: unknown): string {
  const s = err instanceof Error ? err.message : String(err);
  const i = s.indexOf('\n');
  return (i < 0 ? s : s.slice(0, i)).trim();
}

/**
 * A log line that an attacker can trigger as often as it likes: at most one per `key` per `everyMs`, the
 * next one saying how many were left out meanwhile.
 */
export class RateLimitedLog {
  private readonly last = new Map<string, { at: number; suppressed: number }>();
  constructor(
    private readonly log: Logger,
    private readonly everyMs = 1_000,
  ) {}
  warn(key: string, fields: Record<string, unknown>, msg: string): void {
    const now = Date.now();
    const e = this.last.get(key);
    if (e && now - e.at < this.everyMs) {
      e.suppressed++;
      return;
    }
    const suppressed = e?.suppressed ?? 0;
    if (this.last.size > 1024) this.last.clear();
    this.last.set(key, { at: now, suppressed: 0 });
    this.log.warn(suppressed > 0 ? { ...fields, suppressed } : fields, msg);
  }
}

export function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}

/** The net.connect address of a tunnel target (a TCP host and port, or a Unix socket path). */
export function targetAddress(target: TunnelTarget): { host: string; port: number } | { path: string } {
  return 'path' in target ? { path: target.path } : { host: target.host, port: target.port };
}

export function describeTarget(target: TunnelTarget): string {
  return 'path' in target ? target.path : `${target.host}:${target.port}`;
}
