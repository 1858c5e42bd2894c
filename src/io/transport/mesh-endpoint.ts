// The MeshEndpoint over any backend (RawEndpoint): one connection per pair of peers under a fixed rule for
// simultaneous dials, the verdict and liveness probe, accept, stream dispatch by kind, and admission: the mesh
// above says which connections are admitted (admit/refuse), and until then only their control stream is
// served; incoming connections not yet admitted are bounded per remote address and in total.
import { pino, type Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { asEndpointId } from '../../machines/mesh-types.ts';
import { ConnectionImpl, connectionSettings, KIND_VERDICT, type ConnectionSettings } from './mesh-connection.ts';
import {
  CLOSE_CODES,
  DialError,
  Queue,
  RateLimitedLog,
  StreamResetError,
  TransportError,
  delay,
  firstLine,
  shortId,
  type MeshConnection,
  type MeshEndpoint,
  type MeshEndpointComponents,
  type MeshEndpointInit,
  type RawConnection,
  type RawEndpoint,
  type DialOptions,
  type StreamHandler,
  type StreamKind,
} from './transport.ts';

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


/** The MeshEndpoint over any RawEndpoint: connection table, dial/accept with the fixed rule, stream dispatch. */
class EndpointCore implements MeshEndpoint {
  readonly handlers = new Map<StreamKind, StreamHandler>();
  readonly log: Logger;
  readonly limited: RateLimitedLog;
  readonly settings: ConnectionSettings;
  private readonly maxHandshakesPerAddress: number;
  private readonly maxHandshakes: number;
  /** Incoming connections not admitted yet (and not closed), per remote address and in all. */
  private readonly handshaking = new Map<string, number>();
  private handshakingTotal = 0;
  /** Slots of incoming connections still handshaking: released once admitted or closed. */
  private readonly slots = new WeakMap<RawConnection, () => void>();
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
    this.limited = new RateLimitedLog(this.log);
    this.settings = connectionSettings(init);
    this.maxHandshakesPerAddress = init.maxHandshakesPerAddress ?? 16;
    this.maxHandshakes = init.maxHandshakes ?? 256;
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

  admit(connection: MeshConnection): void {
    if (connection instanceof ConnectionImpl && this.all.has(connection)) connection.admit();
  }

  refuse(connection: MeshConnection, reason: string): void {
    if (connection instanceof ConnectionImpl && this.all.has(connection)) connection.refuse(reason);
  }

  /** A connection was admitted or closed: its handshake slot is free. */
  settled(conn: ConnectionImpl): void {
    this.slots.get(conn.raw)?.();
  }

  /**
   * Takes a handshake slot for an incoming connection, or says why there is none. The key is the remote
   * address: a back-off keyed by endpoint id would be dodged with a fresh key.
   */
  private takeSlot(raw: RawConnection): string | null {
    if (!this.settings.admissionRequired) return null;
    const addr = raw.remoteAddress ?? null;
    if (this.handshakingTotal >= this.maxHandshakes) return `${this.maxHandshakes} connections are not admitted yet`;
    const n = addr === null ? 0 : (this.handshaking.get(addr) ?? 0);
    if (addr !== null && n >= this.maxHandshakesPerAddress) return `${n} connections from ${addr} are not admitted yet`;
    this.handshakingTotal++;
    if (addr !== null) this.handshaking.set(addr, n + 1);
    let freed = false;
    const free = (): void => {
      if (freed) return;
      freed = true;
      this.handshakingTotal--;
      if (addr === null) return;
      const m = (this.handshaking.get(addr) ?? 1) - 1;
      if (m <= 0) this.handshaking.delete(addr);
      else this.handshaking.set(addr, m);
    };
    this.slots.set(raw, free);
    void raw.closed.then(free);
    return null;
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
      const busy = this.takeSlot(raw);
      if (busy !== null) {
        this.limited.warn('handshake-bound', { peer: shortId(raw.remoteId), addr: raw.remoteAddress ?? null }, `closing an incoming connection at once: ${busy}`);
        raw.close(CLOSE_CODES.busy, 'too many connections waiting for admission');
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
    this.refuseDuplicate(raw);
  }

  private refuseDuplicate(raw: RawConnection): void {
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
      this.refuseDuplicate(raw);
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
