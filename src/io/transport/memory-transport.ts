// The mesh transport in memory: a RawEndpoint backend for transport.ts with QUIC's semantics (ordered byte
// streams with flow control, reset/stop, graceful close seen by the peer, silent peer death seen only after an
// idle timeout), deterministic (microtasks, or a fixed delay), for tests and the simulator.
import { createHash } from 'node:crypto';
import { pino, type Logger } from 'pino';
import { asEndpointId, type EndpointId } from '../../machines/mesh-types.ts';
import { createMeshEndpoint } from './mesh-endpoint.ts';
import {
  ConnectionClosedError,
  DialError,
  Queue,
  StreamResetError,
  type CloseInfo,
  type MeshEndpoint,
  type MeshEndpointInit,
  type RawConnection,
  type RawEndpoint,
  type RawStream,
} from './transport.ts';

export interface MemoryNetworkInit {
  /** One-way delivery delay in ms; 0 (default) delivers on microtasks. */
  readonly delayMs?: number;
  /** Bytes a stream direction holds unread before write() waits: the flow-control window. Default 256 KiB. */
  readonly streamWindow?: number;
  /** How long after a peer dies its connections close on the other side (QUIC idle timeout). Default 30 s. */
  readonly idleTimeoutMs?: number;
}

export interface MemoryEndpointOptions extends MeshEndpointInit {
  /** A fixed id (64 hex characters); default: derived from a counter, so runs are reproducible. */
  readonly id?: string;
  readonly log?: Logger;
  /**
   * The address peers see this endpoint's connections come from (the per-address handshake bound's key).
   * Default: one of its own; endpoints given the same host play processes on one machine.
   */
  readonly host?: string;
}

/** A world of in-memory endpoints that can dial each other by id. */
export class MemoryNetwork {
  readonly delayMs: number;
  readonly streamWindow: number;
  readonly idleTimeoutMs: number;
  private readonly endpoints = new Map<EndpointId, MemoryRawEndpoint>();
  private counter = 0;

  constructor(init: MemoryNetworkInit = {}) {
    this.delayMs = init.delayMs ?? 0;
    this.streamWindow = init.streamWindow ?? 256 * 1024;
    this.idleTimeoutMs = init.idleTimeoutMs ?? 30_000;
  }

  createEndpoint(options: MemoryEndpointOptions = {}): MeshEndpoint {
    if (options.id !== undefined && this.endpoints.has(asEndpointId(options.id))) {
      throw new Error(`memory endpoint ${options.id} exists already`);
    }
    const raw = this.createRawEndpoint(options.id, options.host);
    return createMeshEndpoint(raw, options, { log: options.log ?? pino({ level: 'silent' }) });
  }

  /**
   * The bare backend without the mesh rules: for tests that play a foreign or broken peer. An id that is
   * taken gives a second instance of that peer (as two processes with one key): it can dial out, and
   * dials to the id still reach the first.
   */
  createRawEndpoint(id?: string, host?: string): RawEndpoint {
    const eid = asEndpointId(id ?? createHash('sha256').update(`memory-endpoint-${this.counter++}`).digest('hex'));
    const raw = new MemoryRawEndpoint(eid, this, host ?? `memory-host-${eid.slice(0, 16)}`);
    if (!this.endpoints.has(eid)) this.endpoints.set(eid, raw);
    return raw;
  }

  /** Peer death (SIGKILL, a cut cable): nothing is sent; the others notice only after idleTimeoutMs. */
  kill(id: string): void {
    const ep = this.endpoints.get(asEndpointId(id));
    if (!ep) return;
    this.endpoints.delete(ep.id);
    ep.die();
  }

  /** Runs `f` after the one-way delay; same-delay calls keep their order (timers and microtasks are FIFO). */
  deliver(f: () => void): void {
    if (this.delayMs > 0) setTimeout(f, this.delayMs);
    else queueMicrotask(f);
  }

  lookup(id: EndpointId): MemoryRawEndpoint | undefined {
    return this.endpoints.get(id);
  }

  forget(ep: MemoryRawEndpoint): void {
    if (this.endpoints.get(ep.id) === ep) this.endpoints.delete(ep.id);
  }
}

/** One direction of a stream: the writer's bytes in order, unread bytes bounded by the window. */
class Pipe {
  private chunks: Uint8Array[] = [];
  /** Written and not yet read (in flight or queued): what the window counts. */
  private unread = 0;
  private fin = false;
  private resetCode: number | undefined;
  private stopCode: number | undefined;
  private failure: Error | undefined;
  private reader: { resolve: (v: Uint8Array | null) => void; reject: (e: Error) => void } | undefined;
  private writers: { resolve: () => void; reject: (e: Error) => void }[] = [];

  constructor(private readonly net: MemoryNetwork) {}

  // --- writer side
  async write(chunk: Uint8Array): Promise<void> {
    this.checkWritable();
    if (chunk.length === 0) return;
    // A copy: the caller may reuse its buffer once write resolves, as with QUIC.
    const copy = chunk.slice();
    this.unread += copy.length;
    this.net.deliver(() => {
      if (this.resetCode !== undefined || this.failure) return;
      this.chunks.push(copy);
      this.wakeReader();
    });
    while (this.unread > this.net.streamWindow) {
      await new Promise<void>((resolve, reject) => this.writers.push({ resolve, reject }));
      this.checkWritable();
    }
  }

  finish(): void {
    this.checkWritable();
    this.net.deliver(() => {
      this.fin = true;
      this.wakeReader();
    });
  }

  resetByWriter(code: number): void {
    this.net.deliver(() => {
      if (this.resetCode !== undefined) return;
      this.resetCode = code;
      this.chunks = [];
      this.wakeReader();
    });
  }

  private checkWritable(): void {
    if (this.failure) throw this.failure;
    if (this.stopCode !== undefined) throw new StreamResetError(this.stopCode);
  }

  // --- reader side
  read(): Promise<Uint8Array | null> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.resetCode !== undefined) return Promise.reject(new StreamResetError(this.resetCode));
    const c = this.chunks.shift();
    if (c) return Promise.resolve(this.consumed(c));
    if (this.fin) return Promise.resolve(null);
    if (this.reader) return Promise.reject(new Error('concurrent read() on one stream'));
    return new Promise((resolve, reject) => (this.reader = { resolve, reject }));
  }

  stopByReader(code: number): void {
    this.net.deliver(() => {
      if (this.stopCode !== undefined) return;
      this.stopCode = code;
      for (const w of this.writers.splice(0)) w.reject(new StreamResetError(code));
    });
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.chunks = [];
    const r = this.reader;
    this.reader = undefined;
    r?.reject(err);
    for (const w of this.writers.splice(0)) w.reject(err);
  }

  private consumed(c: Uint8Array): Uint8Array {
    this.unread -= c.length;
    if (this.unread <= this.net.streamWindow) for (const w of this.writers.splice(0)) w.resolve();
    return c;
  }

  private wakeReader(): void {
    const r = this.reader;
    if (!r) return;
    if (this.resetCode !== undefined) {
      this.reader = undefined;
      r.reject(new StreamResetError(this.resetCode));
      return;
    }
    const c = this.chunks.shift();
    if (c) {
      this.reader = undefined;
      r.resolve(this.consumed(c));
    } else if (this.fin) {
      this.reader = undefined;
      r.resolve(null);
    }
  }
}

/** A dead process does nothing at all: its calls never complete. */
const never = <T>(): Promise<T> => new Promise<T>(() => {});

class MemoryRawStream implements RawStream {
  private finished = false;
  private resetDone = false;
  constructor(
    private readonly send: Pipe,
    private readonly recv: Pipe,
    private readonly owner: MemoryRawEndpoint,
  ) {}
  write(chunk: Uint8Array): Promise<void> {
    return this.owner.dead ? never() : this.send.write(chunk);
  }
  read(): Promise<Uint8Array | null> {
    return this.owner.dead ? never() : this.recv.read();
  }
  async finish(): Promise<void> {
    if (this.finished || this.owner.dead) return;
    this.finished = true;
    this.send.finish();
  }
  reset(code: number): void {
    if (this.resetDone || this.owner.dead) return;
    this.resetDone = true;
    this.send.resetByWriter(code);
    this.recv.stopByReader(code);
  }
}

class MemoryRawConnection implements RawConnection {
  peer!: MemoryRawConnection;
  /** Set on the acceptor's side: the dialer's host. */
  remoteAddress: string | null = null;
  readonly closed: Promise<CloseInfo>;
  private resolveClosed!: (i: CloseInfo) => void;
  private info: CloseInfo | undefined;
  private readonly incoming = new Queue<RawStream>();
  private readonly pipes = new Set<Pipe>();
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly remoteId: EndpointId,
    readonly owner: MemoryRawEndpoint,
    private readonly net: MemoryNetwork,
  ) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
    owner.conns.add(this);
  }

  async openBi(): Promise<RawStream> {
    if (this.info) throw new ConnectionClosedError(this.info);
    const out = new Pipe(this.net);
    const back = new Pipe(this.net);
    this.pipes.add(out).add(back);
    const peer = this.peer;
    this.net.deliver(() => {
      if (peer.info || peer.owner.dead) return;
      peer.pipes.add(out).add(back);
      peer.incoming.push(new MemoryRawStream(back, out, peer.owner));
    });
    return new MemoryRawStream(out, back, this.owner);
  }

  acceptBi(): Promise<RawStream | null> {
    return this.incoming.take();
  }

  close(code: number, reason: string): void {
    if (this.info || this.owner.dead) return;
    this.end({ reason, code, byPeer: false });
    const peer = this.peer;
    this.net.deliver(() => peer.end({ reason, code, byPeer: true }));
  }

  isDirect(): boolean {
    return true;
  }

  /** The peer died: we hear nothing more, and close when the idle timeout runs out. */
  peerDied(): void {
    if (this.info || this.idleTimer) return;
    this.idleTimer = setTimeout(() => this.end({ reason: 'timed out', code: -1, byPeer: true }), this.net.idleTimeoutMs);
  }

  /** `failPipes` false: the pipes are shared with the peer, which must not learn of a death this way. */
  end(info: CloseInfo, failPipes = true): void {
    if (this.info) return;
    this.info = info;
    clearTimeout(this.idleTimer);
    const err = new ConnectionClosedError(info);
    if (failPipes) for (const p of this.pipes) p.fail(err);
    this.pipes.clear();
    this.incoming.end();
    this.owner.conns.delete(this);
    this.resolveClosed(info);
  }
}

class MemoryRawEndpoint implements RawEndpoint {
  readonly conns = new Set<MemoryRawConnection>();
  private readonly accepted = new Queue<RawConnection>();
  dead = false;
  private closedFlag = false;

  constructor(
    readonly id: EndpointId,
    private readonly net: MemoryNetwork,
    readonly host: string,
  ) {}

  addrs(): string[] {
    return [`memory:${this.id.slice(0, 16)}`];
  }

  async dial(id: EndpointId, _addrs: readonly string[], signal: AbortSignal): Promise<RawConnection> {
    const target = this.net.lookup(id);
    if (!target || target.closedFlag) {
      // Like a dead UDP address: no answer, so the dial lasts until the caller's deadline.
      await new Promise<void>((resolve) => {
        if (signal.aborted) resolve();
        signal.addEventListener('abort', () => resolve(), { once: true });
      });
      throw new DialError(id, 'no answer (timed out)');
    }
    const mine = new MemoryRawConnection(id, this, this.net);
    const theirs = new MemoryRawConnection(this.id, target, this.net);
    mine.peer = theirs;
    theirs.peer = mine;
    theirs.remoteAddress = this.host;
    // The handshake: one trip there (the acceptor has it), one back (the dialer has it).
    this.net.deliver(() => {
      if (target.closedFlag) theirs.end({ reason: 'endpoint closed', code: -1, byPeer: false });
      else target.accepted.push(theirs);
    });
    await new Promise<void>((r) => this.net.deliver(() => this.net.deliver(r)));
    if (signal.aborted) {
      mine.close(0, 'dial abandoned');
      throw new DialError(id, 'aborted');
    }
    return mine;
  }

  acceptNext(): Promise<RawConnection | null> {
    return this.accepted.take();
  }

  async close(): Promise<void> {
    if (this.closedFlag) return;
    this.closedFlag = true;
    for (const c of [...this.conns]) c.close(3, 'endpoint closing');
    this.accepted.end();
    this.net.forget(this);
  }

  die(): void {
    this.dead = true;
    this.closedFlag = true;
    for (const c of [...this.conns]) {
      c.peer.peerDied();
      c.end({ reason: 'process died', code: -1, byPeer: false }, false);
    }
    this.accepted.end();
  }
}
