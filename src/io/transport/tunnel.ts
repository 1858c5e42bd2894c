// TCP <-> QUIC tunnels for the rpc and http stream kinds. On the side that starts them, a loopback listener
// turns each accepted socket into a stream to one peer; on the other side, a policy decides where (or
// whether) an incoming stream connects locally. Every token of a split model crosses a tunnel twice, so
// the hot path avoids waits it does not need: no Nagle, the next QUIC read issued before the socket write,
// and TCP bytes that pile up behind a pending QUIC write leave as one write. And because the iroh binding
// costs ~60 ns per byte each side (bytes cross it as number[]), compressible traffic is deflated first:
// llama.cpp's per-token RPC requests shrink to ~0.3 of their size (docs/transport.md has the figures).
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { pino, type Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { TunnelDecision, TunnelKind } from '../../machines/tunnel-policy.ts';
import { CODEC_BYTES, TUNNEL_CLOSED, TUNNEL_REFUSED, TUNNEL_TCP_FAILED, type TunnelCodec } from './tunnel-codec.ts';
import { Pipe, type Counters } from './tunnel-pipe.ts';
import { TransportError, firstLine, shortId, type MeshConnection, type MeshEndpoint, type MeshStream } from './transport.ts';

export type { TunnelKind, TunnelTarget } from '../../machines/tunnel-policy.ts';
export type { TunnelCodec } from './tunnel-codec.ts';

/** Where an incoming tunnel from `remoteId` goes, or why it is refused (logged on both sides). */
export type TunnelPolicy = (remoteId: EndpointId, kind: TunnelKind) => TunnelDecision;

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
