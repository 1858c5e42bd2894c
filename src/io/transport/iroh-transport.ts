// The mesh transport over iroh QUIC (`@number0/iroh` 1.1.0): a RawEndpoint backend for transport.ts.
// It works around the binding's edges (FIELD-FACTS.md): number[] bytes only, no watch* calls, references
// kept to every endpoint and connection, every promise caught, dials raced against our own deadline.
import {
  Endpoint,
  EndpointAddr,
  EndpointId as IrohEndpointId,
  RelayMode,
  presetMinimal,
  presetN0,
  type BiStream,
  type Connection,
  type RecvStream,
  type SendStream,
} from '@number0/iroh';
import { pino, type Logger } from 'pino';
import { asEndpointId, type EndpointId } from '../../machines/mesh-types.ts';
import { createMeshEndpoint } from './mesh-endpoint.ts';
import {
  ConnectionClosedError,
  DialError,
  MESH_ALPN,
  StreamResetError,
  TransportError,
  firstLine,
  shortId,
  type CloseInfo,
  type MeshEndpoint,
  type MeshEndpointInit,
  type RawConnection,
  type RawEndpoint,
  type RawStream,
  Queue,
  type ConnectionPath,
} from './transport.ts';

const ALPN_BYTES: number[] = [...new TextEncoder().encode(MESH_ALPN)];

/** Bytes per read() call: iroh allocates this much per call, and 64 KiB keeps wake-ups per byte low. */
const READ_CHUNK = 64 * 1024;

/** Bytes per writeAll() call: each piece's number[] stays a regular V8 object (see toNumberArray). */
export const WRITE_PIECE = 15 * 1024;

/** How many streams a peer may have open to us at once (iroh's default of 100 blocks the 101st silently). */
const MAX_CONCURRENT_BI_STREAMS = 4096n;

/** QUIC handshakes in progress at once; more incoming connections are refused before any crypto. */
const MAX_QUIC_HANDSHAKES = 256;

/** "1.2.3.4:5" -> "1.2.3.4"; "[::1]:5" -> "::1" (the key of the per-address handshake bound). */
export function hostOf(addr: string): string {
  const v6 = /^\[(.*)\]:\d+$/.exec(addr);
  if (v6) return v6[1]!;
  const i = addr.lastIndexOf(':');
  return i > 0 && addr.indexOf(':') === i ? addr.slice(0, i) : addr;
}

/** `none`: LAN and tests. `default`: iroh's public relays and discovery. `{ url }`: one relay of our own (no discovery). */
export type RelaySetting = 'none' | 'default' | { readonly url: string };

export interface IrohTransportInit extends MeshEndpointInit {
  /** 32 bytes (see secret-key.ts): a fixed key keeps the endpoint id across restarts. */
  readonly secretKey: Uint8Array;
  /** UDP port to bind (`--bind-port`); 0 or absent: ephemeral. */
  readonly bindPort?: number;
  /** Address to bind; default 0.0.0.0 (all interfaces), tests use 127.0.0.1. */
  readonly bindHost?: string;
  /** Default `none`; the CLI's default is `default`. */
  readonly relay?: RelaySetting;
  /** With relays on: the longest we wait for a home relay at start-up. Default 5 s. */
  readonly relayWaitMs?: number;
}

export interface IrohTransportComponents {
  readonly log?: Logger;
}

/** What start-up found about relays, for the node to report. */
export type RelayStatus =
  | { readonly state: 'disabled' }
  | { readonly state: 'online'; readonly url: string | null }
  | { readonly state: 'unreachable'; readonly reason: string };

export interface IrohMeshEndpoint extends MeshEndpoint {
  readonly relayStatus: RelayStatus;
}

// ---------------------------------------------------------------------------------------------------------
// Bytes across the boundary. The binding takes and gives number[] only; a plain indexed loop into a sized
// array is the fastest way there, and Uint8Array.from the fast way back. An array of more than ~16 K elements
// is over V8's largest regular object (128 KiB): building one costs ~0.5 ms at 16 KiB against ~0.03 ms for
// 15 KiB, so writes go in pieces of WRITE_PIECE bytes (bench/iroh-binding.bench.ts, docs/transport.md).

export function toNumberArray(u8: Uint8Array): number[] {
  const n = u8.length;
  const a = new Array<number>(n);
  for (let i = 0; i < n; i++) a[i] = u8[i]!;
  return a;
}

export function fromNumberArray(a: number[]): Uint8Array {
  return Uint8Array.from(a);
}

// ---------------------------------------------------------------------------------------------------------

/** "closed by peer: bye (code 0)" and friends -> CloseInfo. */
export function parseCloseString(s: string, ours: CloseInfo | undefined): CloseInfo {
  const m = /^closed by peer: (.*) \(code (\d+)\)$/s.exec(s);
  if (m) return { reason: m[1]!, code: Number(m[2]), byPeer: true };
  if (ours) return ours;
  return { reason: firstLine(s), code: -1, byPeer: true };
}

/** Maps a rejected read/write to our error classes: "Reset(7)" / "Stopped(5)" / a closed connection. */
function streamError(err: unknown, conn: IrohRawConnection): Error {
  const line = firstLine(err);
  const m = /^(?:Reset|Stopped)\((\d+)\)/.exec(line) ?? /(?:reset|stopped).*?(\d+)/i.exec(line);
  if (m) return new StreamResetError(Number(m[1]));
  if (conn.closeInfo) return new ConnectionClosedError(conn.closeInfo);
  return new TransportError(`stream failed: ${line}`);
}

class IrohRawStream implements RawStream {
  private finished = false;
  private resetDone = false;
  constructor(
    private readonly bi: BiStream,
    private readonly send: SendStream,
    private readonly recv: RecvStream,
    private readonly conn: IrohRawConnection,
  ) {}

  async write(chunk: Uint8Array): Promise<void> {
    if (chunk.length === 0) return;
    try {
      // Pieces in turn: writeAll calls in flight at once may reach the stream in any order.
      for (let o = 0; o < chunk.length; o += WRITE_PIECE) {
        await this.send.writeAll(toNumberArray(chunk.subarray(o, o + WRITE_PIECE)));
      }
    } catch (err) {
      throw streamError(err, this.conn);
    }
  }

  async read(): Promise<Uint8Array | null> {
    let a: number[];
    try {
      a = await this.recv.read(READ_CHUNK);
    } catch (err) {
      throw streamError(err, this.conn);
    }
    // The binding returns [] at the end of the stream (reads of 0 bytes are never asked for).
    return a.length === 0 ? null : fromNumberArray(a);
  }

  async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    try {
      await this.send.finish();
    } catch (err) {
      throw streamError(err, this.conn);
    }
  }

  reset(code: number): void {
    if (this.resetDone) return;
    this.resetDone = true;
    // Neither is awaited: recv.stop() waits for a pending read, which may never come.
    this.send.reset(BigInt(code)).catch(() => {});
    this.recv.stop(BigInt(code)).catch(() => {});
  }

  /** Keeps the BiStream object reachable as long as this wrapper is. */
  get handle(): BiStream {
    return this.bi;
  }
}

class IrohRawConnection implements RawConnection {
  readonly remoteId: EndpointId;
  remoteAddress: string | null = null;
  readonly closed: Promise<CloseInfo>;
  closeInfo: CloseInfo | undefined;
  private ours: CloseInfo | undefined;

  constructor(
    readonly conn: Connection,
    private readonly owner: IrohRawEndpoint,
  ) {
    this.remoteId = asEndpointId(conn.remoteId().toString());
    try {
      conn.setMaxConcurrentBiStreams(MAX_CONCURRENT_BI_STREAMS);
    } catch (err) {
      owner.log.warn({ err: firstLine(err) }, 'could not raise the stream limit');
    }
    // closed() is asked once and kept: it is our only (non-watch) signal of the end.
    this.closed = conn.closed().then(
      (s) => parseCloseString(s, this.ours),
      (err: unknown) => this.ours ?? { reason: firstLine(err), code: -1, byPeer: true },
    );
    void this.closed.then((info) => {
      this.closeInfo = info;
      owner.conns.delete(this);
    });
    owner.conns.add(this);
  }

  async openBi(): Promise<RawStream> {
    try {
      const bi = await this.conn.openBi();
      return new IrohRawStream(bi, bi.send, bi.recv, this);
    } catch (err) {
      if (this.closeInfo) throw new ConnectionClosedError(this.closeInfo);
      throw new TransportError(`open stream: ${firstLine(err)}`);
    }
  }

  async acceptBi(): Promise<RawStream | null> {
    try {
      const bi = await this.conn.acceptBi();
      return new IrohRawStream(bi, bi.send, bi.recv, this);
    } catch {
      return null;
    }
  }

  close(code: number, reason: string): void {
    if (this.closeInfo || this.ours) return;
    this.ours = { reason, code, byPeer: false };
    try {
      this.conn.close(BigInt(code), [...new TextEncoder().encode(reason.slice(0, 200))]);
    } catch (err) {
      this.owner.log.debug({ err: firstLine(err) }, 'close failed');
    }
  }

  isDirect(): boolean {
    try {
      const paths = this.conn.paths();
      const selected = paths.find((p) => p.isSelected) ?? paths[0];
      return selected !== undefined && selected.isIp && !selected.isRelay;
    } catch {
      return false;
    }
  }

  paths(): ConnectionPath[] {
    try {
      return this.conn.paths().map((p) => ({ remoteAddr: p.remoteAddr, selected: p.isSelected, relay: p.isRelay, rttMs: p.rttMs }));
    } catch {
      return [];
    }
  }
}

class IrohRawEndpoint implements RawEndpoint {
  readonly id: EndpointId;
  /** Strong references: the binding closes what the garbage collector reaches. */
  readonly conns = new Set<IrohRawConnection>();
  private readonly lateDials = new Set<Promise<unknown>>();
  private readonly handshakes = new Set<Promise<void>>();
  private readonly accepted = new Queue<RawConnection>();
  private acceptStarted = false;
  private closing = false;

  constructor(
    readonly ep: Endpoint,
    readonly log: Logger,
  ) {
    this.id = asEndpointId(ep.id().toString());
  }

  addrs(): string[] {
    try {
      const a = this.ep.addr();
      const direct = a.directAddresses();
      const relay = a.relayUrl();
      return relay ? [...direct, relay] : direct;
    } catch {
      return [];
    }
  }

  async dial(id: EndpointId, addrs: readonly string[], signal: AbortSignal): Promise<RawConnection> {
    let remote: IrohEndpointId;
    try {
      remote = IrohEndpointId.fromString(id);
    } catch (err) {
      throw new DialError(id, `not an endpoint id (${firstLine(err)})`);
    }
    const relays = addrs.filter((a) => /^https?:\/\//.test(a));
    const direct = addrs.filter((a) => !/^https?:\/\//.test(a));
    let target: EndpointAddr;
    try {
      target = new EndpointAddr(remote, relays[0] ?? null, direct);
    } catch (err) {
      throw new DialError(id, `bad address in ${JSON.stringify(addrs)} (${firstLine(err)})`);
    }
    if (signal.aborted) throw new DialError(id, 'aborted');
    const attempt = this.ep.connect(target, ALPN_BYTES);
    // iroh waits ~30 s on a dead address and cannot be cancelled: race it, and close what arrives late.
    const late = attempt.then(
      (c) => {
        if (signal.aborted) c.close(0n, [...new TextEncoder().encode('dial abandoned')]);
        return c;
      },
      () => undefined,
    );
    this.lateDials.add(late);
    void late.finally(() => this.lateDials.delete(late));
    let conn: Connection;
    try {
      conn = await Promise.race([
        attempt,
        new Promise<never>((_, reject) => {
          if (signal.aborted) reject(new DialError(id, 'aborted'));
          signal.addEventListener('abort', () => reject(new DialError(id, 'aborted')), { once: true });
        }),
      ]);
    } catch (err) {
      if (err instanceof DialError) throw err;
      throw new DialError(id, firstLine(err), { cause: err });
    }
    return new IrohRawConnection(conn, this);
  }

  acceptNext(): Promise<RawConnection | null> {
    if (!this.acceptStarted) {
      this.acceptStarted = true;
      void this.acceptLoop();
    }
    return this.accepted.take();
  }

  private async acceptLoop(): Promise<void> {
    for (;;) {
      let incoming;
      try {
        incoming = await this.ep.acceptNext();
      } catch (err) {
        if (this.closing || this.ep.isClosed()) break;
        this.log.warn({ err: firstLine(err) }, 'acceptNext failed');
        continue;
      }
      if (incoming === null || this.closing) break;
      if (this.handshakes.size >= MAX_QUIC_HANDSHAKES) {
        // QUIC handshakes in progress are bounded too: past the bound, refused before any crypto.
        incoming.refuse().catch(() => {});
        continue;
      }
      // Each handshake runs on its own, so a slow or hostile one does not hold up the others.
      const hs = (async (): Promise<void> => {
        try {
          const from = await incoming.remoteAddr().catch(() => null);
          const accepting = await incoming.accept();
          const conn = await accepting.connect();
          if (this.closing) conn.close(3n, [...new TextEncoder().encode('endpoint closing')]);
          else {
            const raw = new IrohRawConnection(conn, this);
            raw.remoteAddress = from?.kind === 'ip' && from.addr ? hostOf(from.addr) : null;
            this.accepted.push(raw);
          }
        } catch (err) {
          this.log.info({ err: firstLine(err) }, 'incoming handshake failed');
        }
      })();
      this.handshakes.add(hs);
      void hs.finally(() => this.handshakes.delete(hs));
    }
    this.accepted.end();
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    try {
      await this.ep.close();
    } catch (err) {
      this.log.debug({ err: firstLine(err) }, 'endpoint close failed');
    }
    this.accepted.end();
  }
}

/** Whether any of `urls` answers HTTP within `ms` (offline: fails fast or at the bound). */
async function relaysReachable(urls: string[], ms: number): Promise<{ ok: true } | { ok: false; reason: string }> {
  const signal = AbortSignal.timeout(ms);
  const tries = urls.map(async (u) => {
    const res = await fetch(u, { signal, method: 'HEAD' });
    await res.body?.cancel();
    return u;
  });
  try {
    await Promise.any(tries);
    return { ok: true };
  } catch (err) {
    const errs = err instanceof AggregateError ? err.errors : [err];
    const first = errs[0] as { cause?: unknown } | undefined;
    const detail = first?.cause ? firstLine(first.cause) : firstLine(first);
    return { ok: false, reason: `none of ${urls.length} relays answered within ${ms} ms (${detail})` };
  }
}

async function bindIroh(init: IrohTransportInit, useRelays: boolean): Promise<Endpoint> {
  const b = Endpoint.builder();
  const relay = init.relay ?? 'none';
  if (useRelays && relay === 'default') presetN0(b);
  else {
    presetMinimal(b);
    if (useRelays && typeof relay === 'object') b.relayMode(RelayMode.customFromUrls([relay.url]));
  }
  b.alpns([ALPN_BYTES]);
  b.secretKey(toNumberArray(init.secretKey));
  b.bindAddr(`${init.bindHost ?? '0.0.0.0'}:${init.bindPort ?? 0}`);
  try {
    return await b.bind();
  } catch (err) {
    throw new TransportError(`could not bind the endpoint on port ${init.bindPort ?? 0}: ${firstLine(err)}`);
  }
}

/**
 * The bare backend without the mesh rules (no verdicts, no kind dispatch): for tests that must behave like
 * a foreign or broken peer. Relays off.
 */
export async function createIrohRawEndpoint(init: IrohTransportInit, log?: Logger): Promise<RawEndpoint> {
  return new IrohRawEndpoint(await bindIroh(init, false), log ?? pino({ level: 'silent' }));
}

/**
 * Binds an iroh endpoint and wraps it as a MeshEndpoint.
 * With relays on, we first check that a relay answers at all: iroh's n0 preset offline never gets online
 * and retries discovery publishing forever, and a fixed UDP port cannot be rebound in the same process,
 * so the choice must be made before binding. Unreachable relays are reported, not fatal.
 */
export async function createIrohEndpoint(
  init: IrohTransportInit,
  components: IrohTransportComponents = {},
): Promise<IrohMeshEndpoint> {
  const log = components.log ?? pino({ level: 'silent' });
  if (init.secretKey.length !== 32) throw new TransportError(`secret key must be 32 bytes, got ${init.secretKey.length}`);
  const relay = init.relay ?? 'none';
  const relayWaitMs = init.relayWaitMs ?? 5_000;
  let relayStatus: RelayStatus = { state: 'disabled' };
  let useRelays = false;
  if (relay !== 'none') {
    let urls: string[];
    try {
      urls = relay === 'default' ? RelayMode.defaultMode().relayMap().urls() : [new URL(relay.url).toString()];
    } catch (err) {
      throw new TransportError(`bad relay setting ${JSON.stringify(relay)}: ${firstLine(err)}`);
    }
    const probe = await relaysReachable(urls, relayWaitMs);
    if (probe.ok) useRelays = true;
    else {
      relayStatus = { state: 'unreachable', reason: probe.reason };
      log.warn({ reason: probe.reason }, 'relays unreachable: continuing with direct connections only');
    }
  }
  const ep = await bindIroh(init, useRelays);
  if (useRelays) {
    let timer: NodeJS.Timeout | undefined;
    const online = await Promise.race([
      ep.online().then(
        () => true,
        () => false,
      ),
      new Promise<false>((r) => (timer = setTimeout(() => r(false), relayWaitMs))),
    ]);
    clearTimeout(timer);
    if (online) relayStatus = { state: 'online', url: ep.addr().relayUrl() };
    else {
      relayStatus = { state: 'unreachable', reason: `no home relay within ${relayWaitMs} ms` };
      log.warn('relays unreachable: no home relay yet; direct connections work meanwhile');
    }
  }
  const raw = new IrohRawEndpoint(ep, log);
  const mesh = createMeshEndpoint(raw, init, { log });
  log.info({ id: shortId(raw.id), addrs: raw.addrs(), relay: relayStatus.state }, 'iroh endpoint bound');
  return Object.assign(mesh, { relayStatus }) as IrohMeshEndpoint;
}
