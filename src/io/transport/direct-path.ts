// The direct data path: a tunnel's bytes over TCP + TLS 1.3 instead of an iroh stream, whose binding costs
// ~10 ms per 16 KiB round trip (docs/transport.md). The two ends agree a fresh random key for each TCP
// connection over their admitted iroh connection (a `direct` stream: the opener sends a ticket, the acceptor
// checks its tunnel policy and answers where to dial) and use it as TLS's pre-shared key. A key is good for
// one connection, to the peer it was handed to, for the tunnel kind it was asked for, for a few seconds:
// holding the mesh secret is not enough to reach anything here, and a stranger cannot finish a handshake.
import { randomBytes } from 'node:crypto';
import { connect as tcpConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, createServer, type Server, type TLSSocket } from 'node:tls';
import { pack, unpack } from 'msgpackr';
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { firstLine, shortId, targetAddress } from './transport.ts';
import { MAX_PLAN_ID_BYTES, decodePlanId, encodePlanId } from './tunnel-codec.ts';
import type { TunnelKind, TunnelPolicy } from './tunnel.ts';

/** TLS 1.3 with one AEAD: PSK needs a cipher whose hash matches the key's, and nothing here needs more. */
const TLS_OPTIONS = { ciphers: 'TLS_AES_128_GCM_SHA256', minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' } as const;
const TICKET_ID_BYTES = 16;
const TICKET_KEY_BYTES = 32;
const KIND_BYTES: Record<TunnelKind, number> = { rpc: 0x02, http: 0x03 };

/** One connection's credentials: `id` names the key in the handshake (the PSK identity), `key` is the secret. */
export interface DirectTicket {
  readonly id: string;
  readonly key: Buffer;
}

export function newTicket(): DirectTicket {
  return { id: randomBytes(TICKET_ID_BYTES).toString('hex'), key: randomBytes(TICKET_KEY_BYTES) };
}

export class DirectPathError extends Error {
  override name = 'DirectPathError';
}

/**
 * The offer on a `direct` stream: tunnel kind u8 | ticket id (16) | key (32), and for the rpc kind then the
 * plan id the opener runs, length u8 | UTF-8 (protocol 2; length 0: none). http: 49 bytes, rpc: 50 + the id.
 */
export function encodeOffer(kind: TunnelKind, ticket: DirectTicket, planId: string | null = null): Uint8Array {
  const out = Buffer.alloc(OFFER_BYTES);
  out[0] = KIND_BYTES[kind];
  Buffer.from(ticket.id, 'hex').copy(out, 1);
  ticket.key.copy(out, 1 + TICKET_ID_BYTES);
  return kind === 'rpc' ? Buffer.concat([out, encodePlanId(planId)]) : out;
}

/** The fixed part of an offer (an http offer is only that), and the longest rpc offer. */
export const OFFER_BYTES = 1 + TICKET_ID_BYTES + TICKET_KEY_BYTES;
export const MAX_OFFER_BYTES = OFFER_BYTES + 1 + MAX_PLAN_ID_BYTES;

function offerKind(byte: number): TunnelKind {
  const kind = (Object.keys(KIND_BYTES) as TunnelKind[]).find((k) => KIND_BYTES[k] === byte);
  if (kind === undefined) throw new DirectPathError(`unknown tunnel kind ${byte} in a direct offer`);
  return kind;
}

/**
 * How many bytes the offer that starts with `b` has in all, as far as `b` tells: OFFER_BYTES until the rpc
 * kind's plan id length has arrived. Throws DirectPathError on an unknown kind.
 */
export function offerLength(b: Uint8Array): number {
  if (b.length === 0 || offerKind(b[0]!) === 'http') return OFFER_BYTES;
  return b.length <= OFFER_BYTES ? OFFER_BYTES + 1 : OFFER_BYTES + 1 + b[OFFER_BYTES]!;
}

export function decodeOffer(b: Uint8Array): { kind: TunnelKind; ticket: DirectTicket; planId: string | null } {
  const want = offerLength(b);
  if (b.length !== want) throw new DirectPathError(`a direct offer is ${want} bytes, not ${b.length}`);
  const kind = offerKind(b[0]!);
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  const ticket = { id: buf.subarray(1, 1 + TICKET_ID_BYTES).toString('hex'), key: Buffer.from(buf.subarray(1 + TICKET_ID_BYTES, OFFER_BYTES)) };
  let planId: string | null = null;
  if (kind === 'rpc') {
    try {
      planId = decodePlanId(b, OFFER_BYTES)!.planId;
    } catch (err) {
      throw new DirectPathError(`bad plan id in a direct offer: ${firstLine(err)}`);
    }
  }
  return { kind, ticket, planId };
}

/** The acceptor's answer: where to dial ("ip:port", tried together), or why not. */
export type DirectAnswer = { readonly addrs: readonly string[] } | { readonly refuse: string };

/** u16 length | msgpack. */
export function encodeAnswer(a: DirectAnswer): Uint8Array {
  const body = pack(a);
  const out = Buffer.alloc(2 + body.length);
  out.writeUInt16LE(body.length, 0);
  body.copy(out, 2);
  return out;
}

/** Parses a whole answer; null while `b` holds only a prefix of one. Throws DirectPathError on garbage. */
export function decodeAnswer(b: Uint8Array): DirectAnswer | null {
  if (b.length < 2) return null;
  const len = b[0]! | (b[1]! << 8);
  if (b.length < 2 + len) return null;
  if (b.length > 2 + len) throw new DirectPathError('bytes after a direct answer');
  let v: unknown;
  try {
    v = unpack(b.subarray(2));
  } catch (err) {
    throw new DirectPathError(`bad direct answer: ${firstLine(err)}`);
  }
  const o = v as Record<string, unknown> | null;
  if (o !== null && typeof o === 'object' && typeof o['refuse'] === 'string') return { refuse: o['refuse'] };
  if (o !== null && typeof o === 'object' && Array.isArray(o['addrs']) && o['addrs'].length <= 16 && o['addrs'].every((x) => typeof x === 'string' && x.length < 64)) {
    return { addrs: o['addrs'] as string[] };
  }
  throw new DirectPathError('bad direct answer: neither addrs nor refuse');
}

/** Live byte counters of one relayed connection (what /api/status shows per tunnel). */
export interface RelayCounters {
  /** Bytes from the local socket towards the peer. */
  bytesOut: number;
  /** Bytes from the peer to the local socket. */
  bytesIn: number;
}

/**
 * Joins two sockets both ways until either ends or fails; then both are destroyed. Backpressure: a side
 * whose writes queue up pauses the other. `local` is ours (llama-server, rpc-server, an API client).
 */
export function relay(local: Socket, remote: Socket, counters: RelayCounters, onEnd: (why: string) => void): () => void {
  let done = false;
  const end = (why: string): void => {
    if (done) return;
    done = true;
    local.destroy();
    remote.destroy();
    onEnd(why);
  };
  const pump = (from: Socket, to: Socket, count: (n: number) => void): void => {
    from.on('data', (b: Buffer) => {
      count(b.length);
      if (!to.write(b)) {
        from.pause();
        to.once('drain', () => from.resume());
      }
    });
    // Half-close passes through: a client that ends its side may still be owed a reply.
    from.on('end', () => to.end());
    from.on('error', (err) => end(firstLine(err)));
    from.on('close', () => {
      if (to.writableEnded && from.readableEnded) end('closed');
      else end('reset');
    });
  };
  local.setNoDelay(true);
  remote.setNoDelay(true);
  pump(local, remote, (n) => (counters.bytesOut += n));
  pump(remote, local, (n) => (counters.bytesIn += n));
  local.resume();
  remote.resume();
  return () => end('closed locally');
}

/** An incoming connection that passed: who, what for, and its counters. */
export interface DirectConnection {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  readonly counters: RelayCounters;
  close(): void;
}

export interface DirectPathInit {
  /** Where to listen: the address the QUIC endpoint binds (0.0.0.0 on a LAN, 127.0.0.1 in tests). */
  readonly host: string;
  /** 0: ephemeral. */
  readonly port: number;
  /** How long a handed-out key stays good. Default 10 s (it is used within a second when all goes well). */
  readonly ticketTtlMs?: number;
  /** Keys outstanding at once, per peer and in total (a peer that asks and never dials cannot fill memory). */
  readonly maxTicketsPerPeer?: number;
  readonly maxTickets?: number;
  /** A TCP client that does not finish the TLS handshake in this time is dropped. Default 3 s. */
  readonly handshakeTimeoutMs?: number;
  /** How long connecting to the local target may take. Default 5 s. */
  readonly connectTimeoutMs?: number;
}

export interface DirectPathComponents {
  /** The same policy as the QUIC tunnels: checked when the key is asked for and again when it is used. */
  readonly allow: TunnelPolicy;
  /** Where peers may dial us: IPs (our port is added), or "ip:port" where something relays to it (tests, the WAN lab). */
  readonly advertise: () => readonly string[];
  readonly log: Logger;
}

interface Ticket {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  /** rpc: the plan the opener said it runs; the ticket opens a connection for that plan only. */
  readonly planId: string | null;
  readonly key: Buffer;
  readonly expires: number;
}

/**
 * The data port of a node: a TLS server that knows only the keys it handed out. Each key opens one
 * connection, which then joins the local target its tunnel policy names at that moment.
 */
export class DirectPathServer {
  private readonly server: Server;
  private readonly tickets = new Map<string, Ticket>();
  private readonly open = new Set<DirectConnection>();
  private readonly init: Required<DirectPathInit>;
  private readonly refusals = new RefusalLog();
  private boundPort = 0;

  constructor(
    init: DirectPathInit,
    private readonly components: DirectPathComponents,
  ) {
    this.init = { ticketTtlMs: 10_000, maxTicketsPerPeer: 16, maxTickets: 1024, handshakeTimeoutMs: 3_000, connectTimeoutMs: 5_000, ...init };
    this.server = createServer(
      {
        ...TLS_OPTIONS,
        handshakeTimeout: this.init.handshakeTimeoutMs,
        pskCallback: (socket, identity) => {
          const t = this.take(identity);
          if (t === null) return null;
          (socket as TLSSocket & { ticket?: Ticket }).ticket = t;
          return t.key;
        },
      },
      (socket) => this.admitted(socket as TLSSocket & { ticket?: Ticket }),
    );
    this.server.on('tlsClientError', (err, socket) => {
      this.refusals.note(components.log, socket.remoteAddress ?? '?', `no handshake: ${firstLine(err)}`);
      socket.destroy();
    });
    this.server.on('error', (err) => components.log.warn({ err: err.message }, 'data port error'));
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.init.port, this.init.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    }).catch((err: unknown) => {
      const e = err as NodeJS.ErrnoException;
      throw new DirectPathError(
        e.code === 'EADDRINUSE'
          ? `the data port ${this.init.port} (TCP) is already in use: pick another with --data-port`
          : `cannot listen for data connections on ${this.init.host}:${this.init.port}: ${e.message}`,
      );
    });
    const addr = this.server.address();
    this.boundPort = typeof addr === 'object' && addr ? addr.port : 0;
  }

  get port(): number {
    return this.boundPort;
  }

  /**
   * `peer` (on its admitted connection) asks for a direct connection of `kind` with this ticket, for plan
   * `planId` (rpc; null for http). Checks the tunnel policy now (and again, for the same plan, when the key is
   * used) and answers where to dial.
   */
  offer(peer: EndpointId, kind: TunnelKind, ticket: DirectTicket, planId: string | null = null, now = Date.now()): DirectAnswer {
    if (this.boundPort === 0) return { refuse: 'no data port' };
    if (kind === 'http') planId = null;
    const decision = safePolicy(this.components.allow, peer, kind, planId);
    if ('refuse' in decision) return decision;
    this.expire(now);
    let mine = 0;
    for (const t of this.tickets.values()) if (t.peer === peer) mine++;
    if (mine >= this.init.maxTicketsPerPeer || this.tickets.size >= this.init.maxTickets) return { refuse: 'too many direct offers in flight' };
    if (this.tickets.has(ticket.id)) return { refuse: 'ticket id in use' };
    this.tickets.set(ticket.id, { peer, kind, planId, key: ticket.key, expires: now + this.init.ticketTtlMs });
    const addrs = this.components.advertise().map((a) => (isIP(a) === 6 ? `[${a}]:${this.boundPort}` : isIP(a) === 4 ? `${a}:${this.boundPort}` : a));
    return { addrs };
  }

  /** Closes every direct connection of `peer` (the hand-off) and voids its keys. Returns how many closed. */
  closeFrom(peer: EndpointId): number {
    for (const [id, t] of this.tickets) if (t.peer === peer) this.tickets.delete(id);
    let n = 0;
    for (const c of [...this.open]) {
      if (c.peer !== peer) continue;
      c.close();
      n++;
    }
    return n;
  }

  connections(): readonly DirectConnection[] {
    return [...this.open];
  }

  async close(): Promise<void> {
    this.tickets.clear();
    for (const c of [...this.open]) c.close();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  /** A key is good once, and only until it expires. */
  private take(id: string): Ticket | null {
    const t = this.tickets.get(id);
    if (t === undefined) return null;
    this.tickets.delete(id);
    return t.expires >= Date.now() ? t : null;
  }

  private expire(now: number): void {
    for (const [id, t] of this.tickets) if (t.expires < now) this.tickets.delete(id);
  }

  private admitted(socket: TLSSocket & { ticket?: Ticket }): void {
    const t = socket.ticket;
    socket.on('error', () => {});
    if (t === undefined) {
      socket.destroy();
      return;
    }
    // The plan may have changed since the key was asked for: the policy decides again, now, for the ticket's plan.
    const decision = safePolicy(this.components.allow, t.peer, t.kind, t.planId);
    if ('refuse' in decision) {
      this.components.log.warn({ peer: shortId(t.peer), kind: t.kind, planId: t.planId ?? undefined, reason: decision.refuse }, 'refused a data connection');
      socket.destroy();
      return;
    }
    socket.pause();
    const target = tcpConnect({ ...targetAddress(decision), noDelay: true, allowHalfOpen: true });
    const timer = setTimeout(() => target.destroy(new Error('connect timed out')), this.init.connectTimeoutMs);
    const counters: RelayCounters = { bytesIn: 0, bytesOut: 0 };
    let stop = (): void => {
      target.destroy();
      socket.destroy();
    };
    const conn: DirectConnection = { peer: t.peer, kind: t.kind, counters, close: () => stop() };
    this.open.add(conn);
    const unjoined = (why: string): void => {
      clearTimeout(timer);
      if (!this.open.delete(conn)) return;
      this.components.log.warn({ peer: shortId(t.peer), kind: t.kind, err: why }, 'data connection target unreachable');
      target.destroy();
      socket.destroy();
    };
    target.once('error', (err) => unjoined(err.message));
    socket.once('close', () => unjoined('the peer went away first'));
    target.once('connect', () => {
      clearTimeout(timer);
      target.removeAllListeners('error');
      socket.removeAllListeners('close');
      stop = relay(target, socket, counters, () => this.open.delete(conn));
    });
  }
}

function safePolicy(allow: TunnelPolicy, peer: EndpointId, kind: TunnelKind, planId: string | null): ReturnType<TunnelPolicy> {
  try {
    return allow(peer, kind, planId);
  } catch (err) {
    return { refuse: `policy failed: ${firstLine(err)}` };
  }
}

/**
 * Dials the first of `addrs` (all tried at once) that completes the TLS handshake with this ticket, within
 * `timeoutMs`. Rejects with DirectPathError when none does.
 */
export async function dialDirect(addrs: readonly string[], ticket: DirectTicket, timeoutMs: number): Promise<TLSSocket> {
  const targets = addrs.map(parseHostPort).filter((x): x is { host: string; port: number } => x !== null);
  if (targets.length === 0) throw new DirectPathError('the peer gave no address to dial');
  return await new Promise<TLSSocket>((resolve, reject) => {
    const sockets: TLSSocket[] = [];
    let failed = 0;
    let settled = false;
    const errors: string[] = [];
    const timer = setTimeout(() => finish(new DirectPathError(`no direct connection within ${timeoutMs} ms (${targets.map((t) => `${t.host}:${t.port}`).join(', ')})`)), timeoutMs);
    const finish = (winner: TLSSocket | Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      for (const s of sockets) if (s !== winner) s.destroy();
      if (winner instanceof Error) reject(winner);
      else resolve(winner);
    };
    for (const t of targets) {
      const s = tlsConnect({
        ...TLS_OPTIONS,
        host: t.host,
        port: t.port,
        // No certificates: the key authenticates both sides (and names nobody but the ticket).
        checkServerIdentity: () => undefined,
        pskCallback: () => ({ psk: ticket.key, identity: ticket.id }),
      });
      s.setNoDelay(true);
      sockets.push(s);
      s.once('secureConnect', () => {
        s.pause();
        finish(s);
      });
      s.once('error', (err) => {
        errors.push(`${t.host}:${t.port}: ${firstLine(err)}`);
        if (++failed === targets.length) finish(new DirectPathError(`no direct connection: ${errors.join('; ')}`));
      });
    }
  });
}

function parseHostPort(addr: string): { host: string; port: number } | null {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(addr) ?? /^([^:]+):(\d+)$/.exec(addr);
  if (m === null) return null;
  const port = Number(m[2]);
  if (!(port > 0 && port < 65536) || isIP(m[1]!) === 0) return null;
  return { host: m[1]!, port };
}

/** Refusals of strangers are logged, but a flood costs one line a second, with a count. */
class RefusalLog {
  private last = 0;
  private suppressed = 0;

  note(log: Logger, from: string, why: string): void {
    const now = Date.now();
    if (now - this.last < 1_000) {
      this.suppressed++;
      return;
    }
    log.warn({ from, why, alsoRefused: this.suppressed }, 'refused a data connection');
    this.last = now;
    this.suppressed = 0;
  }
}
