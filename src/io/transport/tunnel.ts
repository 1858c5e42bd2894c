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
import { relay, type DirectPathServer, type RelayCounters } from './direct-path.ts';
import { answerDirect, openDirect, requestTicket } from './direct-offer.ts';
import {
  MAX_TUNNEL_HEADER_BYTES,
  TUNNEL_CLOSED,
  TUNNEL_REFUSED,
  TUNNEL_TCP_FAILED,
  TunnelProtocolError,
  decodeTunnelHeader,
  encodeTunnelHeader,
  type TunnelCodec,
} from './tunnel-codec.ts';
import { Pipe, type Counters } from './tunnel-pipe.ts';
import { StageWatch } from './tunnel-watch.ts';
import { TransportError, describeTarget, firstLine, shortId, targetAddress, type MeshConnection, type MeshEndpoint, type MeshStream } from './transport.ts';

export type { TunnelKind, TunnelTarget } from '../../machines/tunnel-policy.ts';
export type { TunnelCodec } from './tunnel-codec.ts';

export type { TunnelComponents, TunnelInfo, TunnelInit, TunnelListener, TunnelPolicy, TunnelReports, TunnelStats } from './tunnel-types.ts';
import type { TunnelComponents, TunnelInfo, TunnelInit, TunnelListener, TunnelPolicy, TunnelReports, TunnelStats } from './tunnel-types.ts';

/** A tunnel connection this node opened on the direct path. */
interface DirectRelay {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  readonly counters: RelayCounters;
  close(): void;
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
  /** Incoming streams whose header (codec, plan id) has not all arrived yet. */
  private readonly heading = new Set<{ peer: EndpointId; stream: MeshStream }>();
  private readonly headerTimeoutMs: number;
  private readonly listeners = new Set<{ server: Server; peer: EndpointId; sockets: Set<Socket> }>();
  private readonly relays = new Set<DirectRelay>();
  private readonly direct: DirectPathServer | null;
  private readonly dataPath: 'auto' | 'quic';
  private readonly directTimeoutMs: number;
  private directOpened = 0;
  private directFallbacks = 0;
  /** The path last used per peer and kind: the choice is logged when it changes, not per connection. */
  private readonly lastPath = new Map<string, 'direct' | 'quic'>();
  /** The address our last direct connection to each peer reached ("ip:port"). */
  private readonly lastDirectAddr = new Map<EndpointId, string>();
  private started = false;
  private readonly report: TunnelReports;
  private readonly watch: StageWatch | null;

  constructor(init: TunnelInit, components: TunnelComponents) {
    this.endpoint = components.endpoint;
    this.log = components.log ?? pino({ level: 'silent' });
    this.allow = init.allow;
    this.highWater = init.highWaterBytes ?? 1024 * 1024;
    this.codec = init.codec ?? 'deflate';
    this.batchRpc = init.batchRpc ?? true;
    this.connectTimeoutMs = init.connectTimeoutMs ?? 5_000;
    this.dataPath = init.dataPath ?? 'quic';
    this.directTimeoutMs = init.directTimeoutMs ?? 1_000;
    this.headerTimeoutMs = init.headerTimeoutMs ?? 5_000;
    this.direct = components.direct ?? null;
    this.report = components.report ?? {};
    const stall = this.report.stall?.bind(this.report);
    this.watch = stall === undefined ? null : new StageWatch(init.stallWatch ?? {}, stall);
  }

  /** Takes the rpc and http stream kinds on the endpoint. */
  start(): void {
    if (this.started) return;
    this.started = true;
    for (const kind of ['rpc', 'http'] as const) {
      this.endpoint.handle(kind, (stream, conn) => void this.incoming(kind, stream, conn));
    }
    this.endpoint.handle('direct', (stream, conn) => {
      void answerDirect(stream, conn, this.direct, this.directTimeoutMs * 2).then((answer) => {
        if ('refuse' in answer) this.log.info({ peer: shortId(conn.remoteId), reason: answer.refuse }, 'refused a direct offer');
      });
    });
  }

  /**
   * A listener on 127.0.0.1 (ephemeral port unless given) whose every connection becomes a `kind` stream
   * to `peer`, over the connection the endpoint holds to it (none: the socket is closed at once). rpc: each
   * connection tells the peer `planId`, the plan our llama-server runs (a worker refuses another plan's).
   */
  async listen(peer: EndpointId, kind: TunnelKind, options: { port?: number; host?: string; planId?: string | null } = {}): Promise<TunnelListener> {
    const host = options.host ?? '127.0.0.1';
    const planId = kind === 'rpc' ? (options.planId ?? null) : null;
    const sockets = new Set<Socket>();
    // Half-open: a client that ends its side may still be owed a reply; we end each side ourselves.
    const server = createServer({ noDelay: true, allowHalfOpen: true }, (socket) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      void this.outgoing(peer, kind, planId, socket);
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
    this.log.debug({ peer: shortId(peer), kind, planId, port }, 'tunnel listener open');
    return {
      peer,
      kind,
      planId,
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
    for (const h of [...this.heading]) {
      if (h.peer !== peer) continue;
      this.heading.delete(h);
      h.stream.reset(TUNNEL_CLOSED);
      n++;
    }
    for (const r of [...this.relays]) {
      if (r.peer !== peer) continue;
      r.close();
      n++;
    }
    n += this.direct?.closeFrom(peer) ?? 0;
    for (const l of [...this.listeners]) if (l.peer === peer) await this.closeListener(l);
    if (n > 0) this.log.info({ peer: shortId(peer), tunnels: n }, 'closed the tunnels of a peer');
    return n;
  }

  stats(): TunnelStats {
    return {
      pipes: this.pipes.size + this.connecting.size + this.relays.size + (this.direct?.connections().length ?? 0),
      listeners: this.listeners.size,
      ...this.counters,
      directOpened: this.directOpened,
      directFallbacks: this.directFallbacks,
    };
  }

  /** Every live tunnel connection, both ways, with its path and bytes. */
  tunnels(): TunnelInfo[] {
    const direct = (side: TunnelInfo['side']) => (r: { peer: EndpointId; kind: TunnelKind; counters: RelayCounters }): TunnelInfo => ({
      peer: r.peer,
      kind: r.kind,
      side,
      path: 'direct',
      bytesOut: r.counters.bytesOut,
      bytesIn: r.counters.bytesIn,
    });
    return [
      ...[...this.relays].map(direct('opened')),
      ...(this.direct?.connections() ?? []).map(direct('accepted')),
      ...[...this.pipes].map((p) => ({ peer: p.peer, kind: p.kind, side: p.side, path: 'quic' as const, bytesOut: p.bytes.bytesOut, bytesIn: p.bytes.bytesIn })),
    ];
  }

  async close(): Promise<void> {
    if (this.started) {
      this.endpoint.unhandle('rpc');
      this.endpoint.unhandle('http');
      this.endpoint.unhandle('direct');
      this.started = false;
    }
    for (const r of [...this.relays]) r.close();
    for (const p of [...this.pipes]) p.fail('tunnels closing', TUNNEL_CLOSED);
    for (const c of this.connecting) {
      c.socket.destroy();
      c.stream.reset(TUNNEL_CLOSED);
    }
    this.connecting.clear();
    for (const h of this.heading) h.stream.reset(TUNNEL_CLOSED);
    this.heading.clear();
    for (const l of [...this.listeners]) await this.closeListener(l);
    this.watch?.close();
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
    if (p.connectionLost !== null) this.report.evidence?.(p.peer, 'quic', p.connectionLost);
  };

  private async outgoing(peer: EndpointId, kind: TunnelKind, planId: string | null, socket: Socket): Promise<void> {
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
    if (kind === 'rpc') this.watch?.attach(peer, planId, socket);
    if (this.dataPath === 'auto' && (await this.tryDirect(peer, kind, planId, conn, socket))) return;
    if (socket.destroyed) return;
    let stream: MeshStream | undefined;
    try {
      const header = encodeTunnelHeader(kind, this.codec, planId);
      stream = await conn.openStream(kind);
      await stream.write(header);
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
    this.track(new Pipe(peer, kind, socket, stream, 'opened', this.codec, this.highWater, this.log, this.counters, this.ended, this.batchRpc));
    socket.resume();
  }

  /**
   * The direct path for one local connection: true when it carries it (or the socket went away meanwhile),
   * false to fall back to QUIC. Each connection tries again: llama-server opens one per rpc-server per start,
   * so a fallback never sticks past a restart.
   */
  private async tryDirect(peer: EndpointId, kind: TunnelKind, planId: string | null, conn: MeshConnection, socket: Socket): Promise<boolean> {
    let tls;
    try {
      tls = await openDirect(conn, kind, planId, this.directTimeoutMs);
    } catch (err) {
      this.directFallbacks++;
      this.notePath(peer, kind, 'quic', firstLine(err));
      return socket.destroyed;
    }
    if (socket.destroyed) {
      tls.destroy();
      return true;
    }
    this.directOpened++;
    this.notePath(peer, kind, 'direct');
    if (tls.remoteAddress !== undefined && tls.remotePort !== undefined) this.lastDirectAddr.set(peer, `${tls.remoteAddress}:${tls.remotePort}`);
    const counters: RelayCounters = { bytesOut: 0, bytesIn: 0 };
    const entry: DirectRelay = { peer, kind, counters, close: () => stop() };
    this.relays.add(entry);
    // A reset here says nothing about the peer's health: heartbeats on the control stream decide that.
    let ours = false;
    const stop = relay(socket, tls, counters, (why) => {
      ours = true;
      this.relays.delete(entry);
      this.log.debug({ peer: shortId(peer), kind, why }, 'direct tunnel closed');
    });
    // The peer's side ended or reset it while ours did not: weak evidence (the peer machine weighs it).
    const farEnd = (why: string) => () => {
      if (!ours) this.report.evidence?.(peer, 'direct', why);
    };
    // Our local client ending first (llama-server closing it) makes the far end's close an answer, not news.
    socket.once('end', () => (ours = true));
    socket.once('close', () => (ours = true));
    tls.once('end', farEnd('ended by the peer'));
    tls.once('error', (err) => farEnd(firstLine(err))());
    return true;
  }

  /**
   * A ticket for one direct `kind` connection to `peer` that someone else will make (llama-server speaking
   * TLS itself), and the address to dial; null unless the last connection of that kind to `peer` went direct
   * (so the address is known to work) and the peer agrees now. rpc: the ticket is bound to `planId` (the
   * plan that llama-server runs). Never throws.
   */
  async directTicket(peer: EndpointId, kind: TunnelKind, planId: string | null = null): Promise<{ address: string; identity: string; key: Buffer } | null> {
    const address = this.lastDirectAddr.get(peer);
    const conn = this.endpoint.connection(peer);
    if (this.dataPath !== 'auto' || this.lastPath.get(`${peer}:${kind}`) !== 'direct' || address === undefined || conn === undefined) return null;
    try {
      const { ticket, addrs } = await requestTicket(conn, kind, planId, this.directTimeoutMs);
      if (!addrs.includes(address)) return null;
      return { address, identity: ticket.id, key: ticket.key };
    } catch (err) {
      this.log.warn({ peer: shortId(peer), kind, err: firstLine(err) }, 'no ticket for a direct connection');
      return null;
    }
  }

  private notePath(peer: EndpointId, kind: TunnelKind, path: 'direct' | 'quic', why?: string): void {
    const key = `${peer}:${kind}`;
    if (this.lastPath.get(key) === path) return;
    this.lastPath.set(key, path);
    if (path === 'direct') this.log.info({ peer: shortId(peer), kind }, 'tunnel data path: direct TCP + TLS');
    else this.log.warn({ peer: shortId(peer), kind, why }, 'tunnel data path: QUIC (the direct path failed)');
  }

  /**
   * The header an incoming stream opens with (codec; rpc: the opener's plan id), within headerTimeoutMs;
   * null when the stream was reset, closed for the hand-off, or sent something else (logged).
   */
  private async readHeader(kind: TunnelKind, stream: MeshStream, peer: EndpointId) {
    const pending = { peer, stream };
    this.heading.add(pending);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TunnelProtocolError(`no tunnel header within ${this.headerTimeoutMs} ms`)), this.headerTimeoutMs);
    });
    try {
      let buf: Uint8Array = new Uint8Array(0);
      for (;;) {
        const read = stream.read();
        read.catch(() => {}); // a reset after the timeout rejects it
        const chunk = await Promise.race([read, timeout]);
        if (!this.heading.has(pending)) return null; // closed for the hand-off meanwhile
        if (chunk === null) throw new TunnelProtocolError('the stream ended before its header');
        buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
        const header = decodeTunnelHeader(kind, buf);
        if (header !== null) return { ...header, rest: buf.subarray(header.end) };
        if (buf.length > MAX_TUNNEL_HEADER_BYTES) throw new TunnelProtocolError('a tunnel header over its size');
      }
    } catch (err) {
      if (!this.heading.has(pending)) return null;
      if (err instanceof TunnelProtocolError) this.log.warn({ peer: shortId(peer), kind, err: err.message }, 'bad tunnel stream');
      stream.reset(TUNNEL_REFUSED);
      return null;
    } finally {
      clearTimeout(timer);
      this.heading.delete(pending);
    }
  }

  private async incoming(kind: TunnelKind, stream: MeshStream, conn: MeshConnection): Promise<void> {
    const peer = conn.remoteId;
    const header = await this.readHeader(kind, stream, peer);
    if (header === null) return;
    let decision: ReturnType<TunnelPolicy>;
    try {
      decision = this.allow(peer, kind, header.planId);
    } catch (err) {
      decision = { refuse: `policy failed: ${firstLine(err)}` };
    }
    if ('refuse' in decision) {
      this.log.warn({ peer: shortId(peer), kind, planId: header.planId ?? undefined, reason: decision.refuse }, 'refused a tunnel');
      stream.reset(TUNNEL_REFUSED);
      return;
    }
    const target = decision;
    const socket = createConnection({ ...targetAddress(target), noDelay: true, allowHalfOpen: true });
    let connected = false;
    const pending = { peer, socket, stream };
    this.connecting.add(pending);
    const timer = setTimeout(() => socket.destroy(new Error('connect timed out')), this.connectTimeoutMs);
    socket.once('connect', () => {
      connected = true;
      clearTimeout(timer);
      if (!this.connecting.delete(pending)) return; // closed for the hand-off meanwhile
      this.track(new Pipe(peer, kind, socket, stream, 'accepted', header.codec, this.highWater, this.log, this.counters, this.ended, this.batchRpc, header.rest));
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      if (connected) return; // the pipe handles it
      this.connecting.delete(pending);
      this.log.warn(
        { peer: shortId(peer), kind, target: describeTarget(target), err: err.message },
        'tunnel target unreachable',
      );
      stream.reset(TUNNEL_TCP_FAILED);
    });
  }
}

