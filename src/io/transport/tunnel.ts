// TCP <-> QUIC tunnels for the rpc and http stream kinds. On the side that starts them, a loopback listener
// turns each accepted socket into a stream to one peer; on the other side, a policy decides where (or
// whether) an incoming stream connects locally. Every token of a split model crosses a tunnel twice, so
// the hot path avoids waits it does not need: no Nagle, the next QUIC read issued before the socket write,
// and TCP bytes that pile up behind a pending QUIC write leave as one write. And because the iroh binding
// costs ~60 ns per byte each side (bytes cross it as number[]), compressible traffic is deflated first:
// llama.cpp's per-token RPC requests shrink to ~0.3 of their size (docs/transport.md has the figures).
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { constants as zconst, deflateRawSync, inflateRawSync } from 'node:zlib';
import { pino, type Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { TunnelDecision, TunnelKind } from '../../machines/tunnel-policy.ts';
import {
  TransportError,
  firstLine,
  shortId,
  type MeshConnection,
  type MeshEndpoint,
  type MeshStream,
} from './transport.ts';

export type { TunnelKind, TunnelTarget } from '../../machines/tunnel-policy.ts';

/** Where an incoming tunnel from `remoteId` goes, or why it is refused (logged on both sides). */
export type TunnelPolicy = (remoteId: EndpointId, kind: TunnelKind) => TunnelDecision;

/** Reset code of a refused tunnel stream. */
export const TUNNEL_REFUSED = 0x10;
/** Reset code when the local TCP side failed (target down, socket error). */
export const TUNNEL_TCP_FAILED = 0x11;
/** Reset code of tunnels closed by closeFrom() (the hand-off). */
export const TUNNEL_CLOSED = 0x12;

/**
 * How a tunnel stream carries its bytes: the opener's first byte after the stream kind says which, and both
 * directions use it. `raw`: the TCP bytes as they are. `deflate`: frames, each stored or deflated.
 */
export type TunnelCodec = 'raw' | 'deflate';
const CODEC_BYTES: Record<TunnelCodec, number> = { raw: 0, deflate: 1 };

export class TunnelProtocolError extends TransportError {
  override name = 'TunnelProtocolError';
}

/** Frame header of the deflate codec: type u8 (0 stored, 1 deflated), payload bytes u32 LE, original bytes u32 LE. */
const FRAME_HEADER = 9;
/** Bigger frames are a protocol error (ours never exceed highWater plus one socket read). */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;
/** Below this, deflate's fixed cost is more than the bytes it could save. */
const MIN_DEFLATE_BYTES = 512;
/** A deflated frame is sent only when it is at most this fraction of the original. */
const DEFLATE_WORTH = 0.8;
/** After a chunk that did not compress, this many chunks go stored before deflate is tried again. */
const DEFLATE_BACKOFF = 16;

/**
 * Turns chunks into frames of the deflate codec. Whether compressing pays is decided per chunk, with a
 * back-off so that incompressible traffic (float activations, the worker's replies) costs one try in 17.
 */
export class FrameEncoder {
  private skip = 0;

  encode(chunk: Uint8Array): Buffer {
    if (chunk.length >= MIN_DEFLATE_BYTES && this.skip === 0) {
      const z = deflateRawSync(chunk, { level: 1, strategy: zconst.Z_DEFAULT_STRATEGY });
      if (z.length <= chunk.length * DEFLATE_WORTH) return frame(1, z, chunk.length);
      this.skip = DEFLATE_BACKOFF;
    } else if (this.skip > 0 && chunk.length >= MIN_DEFLATE_BYTES) {
      this.skip--;
    }
    return frame(0, chunk, chunk.length);
  }
}

function frame(type: 0 | 1, payload: Uint8Array, original: number): Buffer {
  const out = Buffer.allocUnsafe(FRAME_HEADER + payload.length);
  out[0] = type;
  out.writeUInt32LE(payload.length, 1);
  out.writeUInt32LE(original, 5);
  out.set(payload, FRAME_HEADER);
  return out;
}

/**
 * Turns stream reads (split anywhere) back into bytes; throws TunnelProtocolError. A stored frame's bytes
 * are passed on as they arrive (a 1 MiB frame need not be complete first); a deflated one is inflated once
 * all of it is there.
 */
export class FrameDecoder {
  private header = Buffer.alloc(FRAME_HEADER);
  private headerFill = 0;
  /** The frame being received, if any. */
  private frame: { type: 0 | 1; remaining: number; original: number; parts: Buffer[]; len: number } | null = null;

  push(chunk: Uint8Array): Buffer[] {
    const buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    const out: Buffer[] = [];
    let o = 0;
    while (o < buf.length) {
      if (this.frame === null) {
        const n = Math.min(FRAME_HEADER - this.headerFill, buf.length - o);
        buf.copy(this.header, this.headerFill, o, o + n);
        this.headerFill += n;
        o += n;
        if (this.headerFill < FRAME_HEADER) break;
        this.headerFill = 0;
        this.frame = this.parseHeader();
      }
      const f = this.frame;
      const n = Math.min(f.remaining, buf.length - o);
      const piece = buf.subarray(o, o + n);
      o += n;
      f.remaining -= n;
      if (f.type === 0) {
        if (n > 0) out.push(piece);
      } else {
        f.parts.push(piece);
      }
      if (f.remaining === 0) {
        this.frame = null;
        if (f.type === 1) out.push(inflate(f.parts.length === 1 ? f.parts[0]! : Buffer.concat(f.parts, f.len), f.original));
      }
    }
    return out;
  }

  private parseHeader(): { type: 0 | 1; remaining: number; original: number; parts: Buffer[]; len: number } {
    const type = this.header[0]!;
    const len = this.header.readUInt32LE(1);
    const original = this.header.readUInt32LE(5);
    if (type > 1) throw new TunnelProtocolError(`unknown frame type ${type}`);
    if (len > MAX_FRAME_BYTES || original > MAX_FRAME_BYTES) {
      throw new TunnelProtocolError(`frame of ${Math.max(len, original)} bytes is over the ${MAX_FRAME_BYTES} cap`);
    }
    if (type === 0 && original !== len) throw new TunnelProtocolError('stored frame with a wrong length');
    return { type: type as 0 | 1, remaining: len, original, parts: [], len };
  }

  /** Bytes of an incomplete frame at the end of the stream are a protocol error. */
  get midFrame(): boolean {
    return this.frame !== null || this.headerFill > 0;
  }
}

function inflate(payload: Buffer, original: number): Buffer {
  let plain: Buffer;
  try {
    // The cap makes a deflate bomb fail instead of filling memory.
    plain = inflateRawSync(payload, { maxOutputLength: Math.max(1, original) });
  } catch (err) {
    throw new TunnelProtocolError(`bad deflated frame: ${firstLine(err)}`);
  }
  if (plain.length !== original) throw new TunnelProtocolError('deflated frame with a wrong length');
  return plain;
}

/**
 * Where llama.cpp RPC messages end in a byte stream, so that a tunnel can send each message's pieces as one
 * QUIC write instead of one per TCP segment (llama.cpp writes a message in 2-3 send() calls, and a host
 * sends 7 commands per token: each QUIC write costs a wake-up of both processes).
 * Requests (host -> worker) are `cmd u8 | size u64 | payload`; fire-and-forget commands may wait for the
 * next command that needs a reply, which follows at once. Replies (worker -> host) are `size u64 | payload`.
 * Anything that does not parse as RPC turns the scanner off (every chunk is then sent at once): it only
 * ever decides *when* bytes leave, never what they are.
 */
export class RpcBoundaryScanner {
  private header = Buffer.alloc(9);
  private headerFill = 0;
  private payloadLeft = 0;
  private cmd = -1;
  /** Off: not RPC (or a version we do not know); every chunk is urgent. */
  off = false;

  constructor(private readonly direction: 'requests' | 'replies') {}

  /** Feeds a chunk; true when it ends a message that someone waits for (flush now). */
  scan(b: Uint8Array): boolean {
    if (this.off) return true;
    const headerLen = this.direction === 'requests' ? 9 : 8;
    let urgent = false;
    let o = 0;
    while (o < b.length) {
      if (this.payloadLeft === 0 && this.headerFill < headerLen) {
        const n = Math.min(headerLen - this.headerFill, b.length - o);
        this.header.set(b.subarray(o, o + n), this.headerFill);
        this.headerFill += n;
        o += n;
        if (this.headerFill < headerLen) break;
        const sizeAt = this.direction === 'requests' ? 1 : 0;
        const size = this.header.readBigUInt64LE(sizeAt);
        this.cmd = this.direction === 'requests' ? this.header[0]! : -1;
        if (size > BigInt(Number.MAX_SAFE_INTEGER) || (this.direction === 'requests' && !RPC_COMMANDS_KNOWN.has(this.cmd))) {
          this.off = true;
          return true;
        }
        this.payloadLeft = Number(size);
        if (this.payloadLeft === 0) {
          urgent = this.complete() || urgent;
          continue;
        }
      }
      const n = Math.min(this.payloadLeft, b.length - o);
      this.payloadLeft -= n;
      o += n;
      if (this.payloadLeft === 0) urgent = this.complete() || urgent;
    }
    return urgent;
  }

  /** A message ended: urgent unless it is a request that gets no reply. */
  private complete(): boolean {
    this.headerFill = 0;
    return this.direction === 'replies' || !RPC_FIRE_AND_FORGET.has(this.cmd);
  }
}

/** RPC protocol 6 commands (FIELD-FACTS.md): 0..17. */
const RPC_COMMANDS_KNOWN = new Set(Array.from({ length: 18 }, (_, i) => i));
/** FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, GRAPH_COMPUTE, INIT_TENSOR, GRAPH_RECOMPUTE, MEMSET_TENSOR: no reply. */
const RPC_FIRE_AND_FORGET = new Set([4, 5, 6, 10, 12, 16, 17]);
/** The longest fire-and-forget bytes wait for a command that needs a reply. */
const RPC_HOLD_MS = 2;

export interface TunnelInit {
  readonly allow: TunnelPolicy;
  /** How tunnels that this node opens carry bytes; default `deflate`. Incoming ones use the opener's choice. */
  readonly codec?: TunnelCodec;
  /** TCP bytes held while a QUIC write is pending before the socket is paused. Default 1 MiB. */
  readonly highWaterBytes?: number;
  /** How long connecting to a local target may take. Default 5 s. */
  readonly connectTimeoutMs?: number;
  /** Send each llama.cpp RPC message as one QUIC write (RpcBoundaryScanner). Default true. */
  readonly batchRpc?: boolean;
}

export interface TunnelComponents {
  readonly endpoint: MeshEndpoint;
  readonly log?: Logger;
}

export interface TunnelListener {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  readonly host: string;
  readonly port: number;
  close(): Promise<void>;
}

export interface TunnelStats {
  readonly pipes: number;
  readonly listeners: number;
  /** QUIC writes and bytes written (after the codec), over all pipes ever: what a message costs. */
  readonly quicWrites: number;
  readonly quicBytesOut: number;
  /** TCP bytes taken from local sockets (before the codec). */
  readonly tcpBytesIn: number;
  /** QUIC reads (chunks received). */
  readonly quicReads: number;
}

/** Counters shared by a service's pipes (plain increments on the hot path). */
interface Counters {
  quicWrites: number;
  quicBytesOut: number;
  tcpBytesIn: number;
  quicReads: number;
}

/** One socket joined to one stream; ends when both directions have ended or either side failed. */
class Pipe {
  private done = false;
  /** The local TCP peer half-closed: finish the stream once its bytes are out. */
  private tcpEnded = false;
  private finishSent = false;
  /** The stream ended (peer finished): the socket was ended. */
  private quicEnded = false;
  /** TCP bytes waiting for the QUIC write in flight (or for the codec, on the accepting side). */
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

  /** `codec` undefined: we accepted the stream and learn it from its first byte. */
  constructor(
    readonly peer: EndpointId,
    readonly kind: TunnelKind,
    private readonly socket: Socket,
    private readonly stream: MeshStream,
    private codec: TunnelCodec | undefined,
    private readonly highWater: number,
    private readonly log: Logger,
    private readonly counters: Counters,
    private readonly onEnd: (p: Pipe) => void,
    batchRpc: boolean,
  ) {
    if (codec !== undefined) this.useCodec(codec);
    // The opener's TCP peer is llama-server (requests); the acceptor's is the rpc-server (replies).
    this.scanner = kind === 'rpc' && batchRpc ? new RpcBoundaryScanner(codec !== undefined ? 'requests' : 'replies') : null;
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
    void this.fromQuic();
  }

  private useCodec(codec: TunnelCodec): void {
    this.codec = codec;
    if (codec === 'deflate') {
      this.encoder = new FrameEncoder();
      this.decoder = new FrameDecoder();
    }
  }

  private fromTcp(b: Buffer): void {
    this.counters.tcpBytesIn += b.length;
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
    if (this.writing || this.done || this.codec === undefined) return;
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
        (err: unknown) => this.fail(`quic write: ${firstLine(err)}`, TUNNEL_TCP_FAILED),
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

  private async fromQuic(): Promise<void> {
    // The next read is in flight while the socket takes the current chunk: one less wait per message.
    let next = this.stream.read();
    try {
      for (;;) {
        let chunk = await next;
        if (chunk === null) break;
        this.counters.quicReads++;
        next = this.stream.read();
        next.catch(() => {});
        if (this.done) return;
        if (this.codec === undefined) {
          const c = decodeCodec(chunk[0]!);
          if (c === undefined) throw new TunnelProtocolError(`unknown tunnel codec ${chunk[0]}`);
          this.useCodec(c);
          this.flush();
          chunk = chunk.subarray(1);
          if (chunk.length === 0) continue;
        }
        if (this.decoder) {
          for (const part of this.decoder.push(chunk)) if (!this.socket.write(part)) await this.drained();
        } else if (!this.socket.write(chunk)) {
          await this.drained();
        }
      }
      if (this.decoder?.midFrame) throw new TunnelProtocolError('the stream ended inside a frame');
    } catch (err) {
      if (err instanceof TunnelProtocolError) this.log.warn({ peer: shortId(this.peer), kind: this.kind, err: err.message }, 'bad tunnel stream');
      this.fail(`quic read: ${firstLine(err)}`, TUNNEL_TCP_FAILED);
      return;
    }
    if (this.done) return;
    this.quicEnded = true;
    this.socket.end();
    this.maybeDone();
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

function decodeCodec(byte: number): TunnelCodec | undefined {
  return (Object.keys(CODEC_BYTES) as TunnelCodec[]).find((k) => CODEC_BYTES[k] === byte);
}

/**
 * The tunnels of one node. It handles incoming rpc and http streams on the endpoint (through the policy)
 * and opens local listeners that lead to a peer.
 */
export class TunnelService {
  private readonly endpoint: MeshEndpoint;
  private readonly log: Logger;
  private readonly allow: TunnelPolicy;
  private readonly highWater: number;
  private readonly connectTimeoutMs: number;
  private readonly codec: TunnelCodec;
  private readonly batchRpc: boolean;
  private readonly pipes = new Set<Pipe>();
  private readonly counters: Counters = { quicWrites: 0, quicBytesOut: 0, tcpBytesIn: 0, quicReads: 0 };
  /** Incoming tunnels whose local TCP connect is still in progress (closeFrom must reach them too). */
  private readonly connecting = new Set<{ peer: EndpointId; socket: Socket; stream: MeshStream }>();
  private readonly listeners = new Set<{ server: Server; peer: EndpointId; sockets: Set<Socket> }>();
  private started = false;

  constructor(init: TunnelInit, components: TunnelComponents) {
    this.endpoint = components.endpoint;
    this.log = components.log ?? pino({ level: 'silent' });
    this.allow = init.allow;
    this.highWater = init.highWaterBytes ?? 1024 * 1024;
    this.codec = init.codec ?? 'deflate';
    this.batchRpc = init.batchRpc ?? true;
    this.connectTimeoutMs = init.connectTimeoutMs ?? 5_000;
  }

  /** Takes the rpc and http stream kinds on the endpoint. */
  start(): void {
    if (this.started) return;
    this.started = true;
    for (const kind of ['rpc', 'http'] as const) {
      this.endpoint.handle(kind, (stream, conn) => this.incoming(kind, stream, conn));
    }
  }

  /**
   * A listener on 127.0.0.1 (ephemeral port unless given) whose every connection becomes a `kind` stream
   * to `peer`, over the connection the endpoint holds to it (none: the socket is closed at once).
   */
  async listen(peer: EndpointId, kind: TunnelKind, options: { port?: number; host?: string } = {}): Promise<TunnelListener> {
    const host = options.host ?? '127.0.0.1';
    const sockets = new Set<Socket>();
    // Half-open: a client that ends its side may still be owed a reply; we end each side ourselves.
    const server = createServer({ noDelay: true, allowHalfOpen: true }, (socket) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      void this.outgoing(peer, kind, socket);
    });
    const entry = { server, peer, sockets };
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port ?? 0, host, () => {
        server.off('error', reject);
        resolve();
      });
    }).catch((err: unknown) => {
      throw new TransportError(`cannot listen for the ${kind} tunnel on ${host}:${options.port ?? 0}: ${firstLine(err)}`);
    });
    server.on('error', (err) => this.log.warn({ err: err.message }, 'tunnel listener error'));
    this.listeners.add(entry);
    const addr = server.address();
    const port = typeof addr === 'object' && addr ? addr.port : 0;
    this.log.debug({ peer: shortId(peer), kind, port }, 'tunnel listener open');
    return {
      peer,
      kind,
      host,
      port,
      close: () => this.closeListener(entry),
    };
  }

  /** Closes every tunnel with `peer` at once, both ways, and its listeners (the hand-off). Returns how many. */
  async closeFrom(peer: EndpointId): Promise<number> {
    let n = 0;
    for (const p of [...this.pipes]) {
      if (p.peer !== peer) continue;
      p.fail('closed for the hand-off', TUNNEL_CLOSED);
      n++;
    }
    for (const c of [...this.connecting]) {
      if (c.peer !== peer) continue;
      this.connecting.delete(c);
      c.socket.destroy();
      c.stream.reset(TUNNEL_CLOSED);
      n++;
    }
    for (const l of [...this.listeners]) if (l.peer === peer) await this.closeListener(l);
    if (n > 0) this.log.info({ peer: shortId(peer), tunnels: n }, 'closed the tunnels of a peer');
    return n;
  }

  stats(): TunnelStats {
    return { pipes: this.pipes.size + this.connecting.size, listeners: this.listeners.size, ...this.counters };
  }

  async close(): Promise<void> {
    if (this.started) {
      this.endpoint.unhandle('rpc');
      this.endpoint.unhandle('http');
      this.started = false;
    }
    for (const p of [...this.pipes]) p.fail('tunnels closing', TUNNEL_CLOSED);
    for (const c of this.connecting) {
      c.socket.destroy();
      c.stream.reset(TUNNEL_CLOSED);
    }
    this.connecting.clear();
    for (const l of [...this.listeners]) await this.closeListener(l);
  }

  private async closeListener(entry: { server: Server; sockets: Set<Socket> }): Promise<void> {
    if (!this.listeners.delete(entry as never)) return;
    for (const s of entry.sockets) s.destroy();
    await new Promise<void>((r) => entry.server.close(() => r()));
  }

  private track(p: Pipe): void {
    this.pipes.add(p);
  }

  private readonly ended = (p: Pipe): void => {
    this.pipes.delete(p);
  };

  private async outgoing(peer: EndpointId, kind: TunnelKind, socket: Socket): Promise<void> {
    socket.setNoDelay(true);
    socket.on('error', () => {});
    const conn = this.endpoint.connection(peer);
    if (!conn) {
      this.log.warn({ peer: shortId(peer), kind }, 'no connection to the peer for this tunnel; socket closed');
      socket.destroy();
      return;
    }
    // Bytes the local client sends before the stream is open wait in the socket (paused).
    socket.pause();
    let stream: MeshStream | undefined;
    try {
      stream = await conn.openStream(kind);
      await stream.write(Uint8Array.of(CODEC_BYTES[this.codec]));
    } catch (err) {
      this.log.warn({ peer: shortId(peer), kind, err: firstLine(err) }, 'could not open a tunnel stream');
      stream?.reset(TUNNEL_TCP_FAILED);
      socket.destroy();
      return;
    }
    if (socket.destroyed) {
      stream.reset(TUNNEL_TCP_FAILED);
      return;
    }
    this.track(new Pipe(peer, kind, socket, stream, this.codec, this.highWater, this.log, this.counters, this.ended, this.batchRpc));
    socket.resume();
  }

  private incoming(kind: TunnelKind, stream: MeshStream, conn: MeshConnection): void {
    const peer = conn.remoteId;
    let decision: ReturnType<TunnelPolicy>;
    try {
      decision = this.allow(peer, kind);
    } catch (err) {
      decision = { refuse: `policy failed: ${firstLine(err)}` };
    }
    if ('refuse' in decision) {
      this.log.warn({ peer: shortId(peer), kind, reason: decision.refuse }, 'refused a tunnel');
      stream.reset(TUNNEL_REFUSED);
      return;
    }
    const target = decision;
    const socket = createConnection({ host: target.host, port: target.port, noDelay: true, allowHalfOpen: true });
    let connected = false;
    const pending = { peer, socket, stream };
    this.connecting.add(pending);
    const timer = setTimeout(() => socket.destroy(new Error('connect timed out')), this.connectTimeoutMs);
    socket.once('connect', () => {
      connected = true;
      clearTimeout(timer);
      if (!this.connecting.delete(pending)) return; // closed for the hand-off meanwhile
      this.track(new Pipe(peer, kind, socket, stream, undefined, this.highWater, this.log, this.counters, this.ended, this.batchRpc));
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      if (connected) return; // the pipe handles it
      this.connecting.delete(pending);
      this.log.warn(
        { peer: shortId(peer), kind, target: `${target.host}:${target.port}`, err: err.message },
        'tunnel target unreachable',
      );
      stream.reset(TUNNEL_TCP_FAILED);
    });
  }
}
