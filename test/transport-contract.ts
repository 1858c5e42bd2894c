// The contract every MeshEndpoint backend must meet, run against the in-memory and the iroh transport
// (test/transport-memory.test.ts, test/transport-iroh.test.ts).
import { afterEach, describe, expect, it } from 'vitest';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import {
  CLOSE_CODES,
  RESET_CODES,
  STREAM_KIND_BYTES,
  StreamResetError,
  type MeshConnection,
  type MeshEndpoint,
  type MeshEndpointInit,
  type MeshStream,
  type RawEndpoint,
} from '../src/io/transport/transport.ts';

export interface RemotePeer {
  readonly id: EndpointId;
  readonly addrs: string[];
  /** Kill without a word (SIGKILL for a process). */
  kill(): void;
  /** With `dialTo`: how the peer's own dial at start-up ended ('ok' or the error message). */
  readonly dialed?: string;
}

export interface RemotePeerOptions {
  /** A fixed identity (from `identityAbove`), to come back as the same endpoint id after a kill. */
  readonly identity?: string;
  /** Dial this endpoint at start-up (and report how it went in `dialed`). */
  readonly dialTo?: { readonly id: EndpointId; readonly addrs: string[] };
}

export interface ContractBackend {
  readonly name: string;
  endpoint(init?: MeshEndpointInit): Promise<MeshEndpoint>;
  /**
   * The bare backend, playing a foreign peer; with an identity, a second instance of that peer. All raw
   * endpoints of a backend dial from one address (one machine), as the per-address handshake bound sees it.
   */
  rawEndpoint(identity?: string): Promise<RawEndpoint>;
  /** A peer that echoes control streams and can be killed silently. */
  remotePeer(options?: RemotePeerOptions): Promise<RemotePeer>;
  /** An identity whose endpoint id sorts above `id`. */
  identityAbove(id: EndpointId): Promise<string>;
  /** Generous ceiling for noticing a killed peer without heartbeats (QUIC idle timeout for iroh). */
  readonly deathCeilingMs: number;
}

export function echo(stream: MeshStream): void {
  void (async () => {
    for (;;) {
      const chunk = await stream.read();
      if (chunk === null) break;
      await stream.write(chunk);
    }
    await stream.finish();
  })().catch(() => {});
}

export async function readAll(stream: MeshStream): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let n = 0;
  for (;;) {
    const c = await stream.read();
    if (c === null) break;
    parts.push(c);
    n += c.length;
  }
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<never>((_, reject) => (t = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms))),
  ]);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A deterministic byte pattern: position i holds (i * 7 + seed) & 255. */
function pattern(n: number, seed: number, offset = 0): Uint8Array {
  const a = new Uint8Array(n);
  for (let i = 0; i < n; i++) a[i] = ((offset + i) * 7 + seed) & 255;
  return a;
}

export function transportContract(backend: ContractBackend): void {
  describe(`transport contract: ${backend.name}`, () => {
    const cleanups: (() => Promise<void> | void)[] = [];
    afterEach(async () => {
      for (const f of cleanups.splice(0).reverse()) await f();
    });
    // The transport's own rules run with admission open; the admission tests below ask for it.
    async function ep(init: MeshEndpointInit = { admission: 'open' }): Promise<MeshEndpoint> {
      const e = await backend.endpoint(init);
      cleanups.push(() => e.close());
      return e;
    }
    async function pair(): Promise<{ a: MeshEndpoint; b: MeshEndpoint; ab: MeshConnection }> {
      const a = await ep();
      const b = await ep();
      b.handle('control', (s) => echo(s));
      const ab = await a.dial(b.id, b.addrs());
      return { a, b, ab };
    }

    it('carries bytes in order both ways, and finish ends the peer read', async () => {
      const { ab } = await pair();
      const s = await ab.openStream('control');
      // Sizes from 1 byte to 200 KiB: splitting and joining must never reorder.
      const sizes = [1, 2, 3, 100, 1500, 65_535, 65_536, 65_537, 200_000, 7, 1];
      const total = sizes.reduce((x, y) => x + y, 0);
      const readBack = readAll(s);
      let off = 0;
      for (const n of sizes) {
        await s.write(pattern(n, 3, off));
        off += n;
      }
      await s.finish();
      const got = await within(readBack, 20_000, 'echo');
      expect(got.length).toBe(total);
      expect(Buffer.from(got).equals(Buffer.from(pattern(total, 3)))).toBe(true);
      expect(s.kind).toBe('control');
    });

    it('gives the handler the stream kind, the connection and the peer id', async () => {
      const a = await ep();
      const b = await ep();
      const seen: { kind: string; from: string; same: boolean }[] = [];
      b.handle('http', (s, c) => {
        seen.push({ kind: s.kind, from: s.remoteId, same: c === b.connection(a.id) });
        echo(s);
      });
      const c = await a.dial(b.id, b.addrs());
      const s = await c.openStream('http');
      await s.write(new Uint8Array([9]));
      expect(await within(s.read(), 5_000, 'read')).toEqual(new Uint8Array([9]));
      expect(seen).toEqual([{ kind: 'http', from: a.id, same: true }]);
      expect(c.isDirect()).toBe(true);
      expect(c.dialer).toBe('local');
    });

    it('applies backpressure: writes stall while the peer does not read, then everything arrives', async () => {
      const a = await ep();
      const b = await ep();
      let held: MeshStream | undefined;
      b.handle('rpc', (s) => (held = s));
      const c = await a.dial(b.id, b.addrs());
      const s = await c.openStream('rpc');
      const chunk = 64 * 1024;
      let written = 0;
      let stalled: Promise<void> | undefined;
      // Without backpressure all 64 MiB would be taken at once.
      while (written < 64 * 1024 * 1024) {
        const w = s.write(pattern(chunk, 1, written));
        written += chunk;
        const r = await Promise.race([w.then(() => 'ok' as const), sleep(1_000).then(() => 'stall' as const)]);
        if (r === 'stall') {
          stalled = w;
          break;
        }
      }
      expect(stalled).toBeDefined();
      expect(written).toBeLessThan(32 * 1024 * 1024);
      expect(held).toBeDefined();
      // Reading frees the stalled write; only then may the writer go on (and finish).
      const drained = readAll(held!);
      await within(stalled!, 10_000, 'stalled write resumes');
      await s.finish();
      const got = await within(drained, 30_000, 'drain');
      expect(got.length).toBe(written);
      expect(Buffer.from(got).equals(Buffer.from(pattern(written, 1)))).toBe(true);
    });

    it('reset by the opener fails the peer read; reset by the acceptor fails the opener; the connection stays', async () => {
      const a = await ep();
      const b = await ep();
      const accepted: MeshStream[] = [];
      b.handle('rpc', (s) => accepted.push(s));
      b.handle('control', (s) => echo(s));
      const c = await a.dial(b.id, b.addrs());

      const s1 = await c.openStream('rpc');
      await s1.write(new Uint8Array([1, 2, 3]));
      await within(waitFor(() => accepted.length === 1), 5_000, 'accept 1');
      const peer1 = accepted[0]!;
      expect(await peer1.read()).toEqual(new Uint8Array([1, 2, 3]));
      s1.reset(42);
      await expect(within(peer1.read(), 5_000, 'read after reset')).rejects.toBeInstanceOf(StreamResetError);

      const s2 = await c.openStream('rpc');
      await s2.write(new Uint8Array([4]));
      await within(waitFor(() => accepted.length === 2), 5_000, 'accept 2');
      const peer2 = accepted[1]!;
      peer2.reset(7);
      await expect(within(s2.read(), 5_000, 'opener read after peer reset')).rejects.toBeInstanceOf(StreamResetError);
      // Writing into a stream the peer stopped fails too (perhaps after what was already in flight).
      await expect(
        within(
          (async () => {
            for (let i = 0; i < 100; i++) {
              await s2.write(new Uint8Array(1024));
              await sleep(10);
            }
          })(),
          10_000,
          'write after peer reset',
        ),
      ).rejects.toBeInstanceOf(StreamResetError);

      expect(c.isClosed).toBe(false);
      const s3 = await c.openStream('control');
      await s3.write(new Uint8Array([5]));
      expect(await within(s3.read(), 5_000, 'after resets')).toEqual(new Uint8Array([5]));
    });

    it('runs more than 100 streams at once on one connection', async () => {
      const { ab } = await pair();
      const n = 150;
      const streams = await within(
        Promise.all(Array.from({ length: n }, () => ab.openStream('control'))),
        20_000,
        'open 150',
      );
      // All open at the same time: write to every one before finishing any.
      for (let i = 0; i < n; i++) await streams[i]!.write(pattern(100, i));
      const results = await within(
        Promise.all(
          streams.map(async (s, i) => {
            await s.finish();
            const got = await readAll(s);
            return Buffer.from(got).equals(Buffer.from(pattern(100, i)));
          }),
        ),
        30_000,
        'echo on 150',
      );
      expect(results.every(Boolean)).toBe(true);
    });

    it('keeps exactly one connection when both peers dial at once, the same one on both sides', async () => {
      for (let round = 0; round < 5; round++) {
        const a = await ep();
        const b = await ep();
        const onB: string[] = [];
        const onA: string[] = [];
        b.handle('control', (s, c) => {
          onB.push(c === b.connection(a.id) ? 'current' : 'other');
          echo(s);
        });
        a.handle('control', (s, c) => {
          onA.push(c === a.connection(b.id) ? 'current' : 'other');
          echo(s);
        });
        const [ca, cb] = await within(
          Promise.all([a.dial(b.id, b.addrs()), b.dial(a.id, a.addrs())]),
          15_000,
          'simultaneous dial',
        );
        await sleep(300);
        expect(ca.isClosed).toBe(false);
        expect(cb.isClosed).toBe(false);
        expect(a.connections()).toHaveLength(1);
        expect(b.connections()).toHaveLength(1);
        expect(a.connection(b.id)).toBe(ca);
        expect(b.connection(a.id)).toBe(cb);
        // One side dialed the survivor, the other accepted it.
        expect([ca.dialer, cb.dialer].sort()).toEqual(['local', 'remote']);
        // The survivor was dialed by the smaller id.
        const smaller = a.id < b.id ? ca : cb;
        expect(smaller.dialer).toBe('local');
        // Streams opened by either side land on the other side's current connection.
        for (const [c, seen] of [
          [ca, onB],
          [cb, onA],
        ] as const) {
          const s = await c.openStream('control');
          await s.write(new Uint8Array([round]));
          expect(await within(s.read(), 5_000, 'echo')).toEqual(new Uint8Array([round]));
          expect(seen).toEqual(['current']);
        }
        // Each connection was delivered once: to the dials, nothing left for accept().
        const extra = await Promise.race([a.accept(), b.accept(), sleep(100).then(() => 'none')]);
        expect(extra).toBe('none');
        await a.close();
        await b.close();
      }
    });

    it('joins concurrent dials to the same peer, and a later dial returns the live connection', async () => {
      const a = await ep();
      const b = await ep();
      const [c1, c2] = await Promise.all([a.dial(b.id, b.addrs()), a.dial(b.id, b.addrs())]);
      expect(c1).toBe(c2);
      expect(await a.dial(b.id, b.addrs())).toBe(c1);
      const inbound = await within(b.accept(), 5_000, 'accept');
      expect(inbound?.remoteId).toBe(a.id);
      expect(b.connections()).toHaveLength(1);
    });

    it('sees a graceful close by the peer fast, with its reason', async () => {
      const a = await ep();
      const b = await ep();
      const ab = await a.dial(b.id, b.addrs());
      const ba = (await within(b.accept(), 5_000, 'accept'))!;
      const t0 = performance.now();
      ab.close('leaving the mesh');
      const info = await within(ba.closed, 5_000, 'peer sees the close');
      expect(performance.now() - t0).toBeLessThan(5_000);
      expect(info).toMatchObject({ reason: 'leaving the mesh', byPeer: true });
      expect(ba.isClosed).toBe(true);
      expect(b.connection(a.id)).toBeUndefined();
      expect((await ab.closed).byPeer).toBe(false);
    });

    it('closing an endpoint closes its connections on the other side', async () => {
      const a = await ep();
      const b = await ep();
      await a.dial(b.id, b.addrs());
      const ba = (await within(b.accept(), 5_000, 'accept'))!;
      await a.close();
      const info = await within(ba.closed, 5_000, 'peer sees endpoint close');
      expect(info.byPeer).toBe(true);
      await expect(a.dial(b.id, b.addrs())).rejects.toThrow(/closed/);
    });

    it('fails a dial to a silent address at the caller deadline, with a clear error', async () => {
      const a = await ep();
      const gone = await ep();
      const { id, addrs } = { id: gone.id, addrs: gone.addrs() };
      await gone.close();
      await sleep(50);
      const t0 = performance.now();
      await expect(a.dial(id, addrs, { timeoutMs: 700 })).rejects.toThrow(/dial .*(timed out|closed|refused|no answer)/);
      expect(performance.now() - t0).toBeLessThan(10_000);
    });

    it('notices a killed peer eventually, and can dial it again when it comes back as a new process', async () => {
      const a = await ep();
      const peer = await backend.remotePeer();
      const c = await a.dial(peer.id, peer.addrs);
      const s = await c.openStream('control');
      await s.write(new Uint8Array([1]));
      expect(await within(s.read(), 5_000, 'echo from the peer')).toEqual(new Uint8Array([1]));
      peer.kill();
      const info = await within(c.closed, backend.deathCeilingMs, 'death noticed');
      expect(info.byPeer).toBe(true);
      expect(a.connection(peer.id)).toBeUndefined();
      const again = await backend.remotePeer();
      cleanups.push(() => again.kill());
      const c2 = await a.dial(again.id, again.addrs);
      const s2 = await c2.openStream('control');
      await s2.write(new Uint8Array([2]));
      expect(await within(s2.read(), 5_000, 'echo from the new peer')).toEqual(new Uint8Array([2]));
    }, 120_000);

    it('lets a killed peer that comes back with the same id in at once, replacing our zombie connection', async () => {
      // We are the smaller id and dialed it, so its new dial is the "duplicate" kind: only the probe tells
      // that our connection is dead, long before QUIC's idle timeout would.
      const a = await ep();
      const identity = await backend.identityAbove(a.id);
      const first = await backend.remotePeer({ identity });
      const zombie = await a.dial(first.id, first.addrs);
      const s = await zombie.openStream('control');
      await s.write(new Uint8Array([1]));
      expect(await within(s.read(), 5_000, 'echo')).toEqual(new Uint8Array([1]));
      first.kill();
      const t0 = performance.now();
      const again = await backend.remotePeer({ identity, dialTo: { id: a.id, addrs: a.addrs() } });
      cleanups.push(() => again.kill());
      expect(again.id).toBe(first.id);
      expect(again.dialed).toBe('ok');
      const fresh = (await within(a.accept(), 5_000, 'the new connection'))!;
      expect(fresh.remoteId).toBe(first.id);
      expect(await within(zombie.closed, 5_000, 'zombie replaced')).toMatchObject({ byPeer: false });
      expect(a.connection(first.id)).toBe(fresh);
      // Well under the ~30 s a zombie would otherwise live.
      expect(performance.now() - t0).toBeLessThan(15_000);
      const s2 = await fresh.openStream('control');
      await s2.write(new Uint8Array([2]));
      expect(await within(s2.read(), 5_000, 'echo on the new connection')).toEqual(new Uint8Array([2]));
    }, 60_000);

    it('still refuses a crossing dial from the larger id while our connection to it answers', async () => {
      const a = await ep();
      const identity = await backend.identityAbove(a.id);
      const peer = await backend.remotePeer({ identity });
      cleanups.push(() => peer.kill());
      const c = await a.dial(peer.id, peer.addrs);
      // A second instance with the peer's identity dials us: our live connection must stay the pair's.
      const twin = await backend.rawEndpoint(identity);
      cleanups.push(() => twin.close());
      const dup = await twin.dial(a.id, a.addrs(), new AbortController().signal);
      const info = await within(dup.closed, 5_000, 'the duplicate is refused');
      expect(info).toMatchObject({ code: CLOSE_CODES.duplicate, byPeer: true });
      expect(a.connection(peer.id)).toBe(c);
      expect(c.isClosed).toBe(false);
    });

    it('resets a stream of an unknown or unhandled kind and keeps the connection', async () => {
      const b = await ep();
      const got: Uint8Array[] = [];
      b.handle('control', (s) => void s.read().then((c) => c && got.push(c)));
      const raw = await backend.rawEndpoint();
      cleanups.push(() => raw.close());
      const conn = await raw.dial(b.id, b.addrs(), new AbortController().signal);
      cleanups.push(() => conn.close(0, 'done'));
      for (const byte of [0x7f, 0xff, STREAM_KIND_BYTES.reserved, STREAM_KIND_BYTES.http]) {
        const s = await conn.openBi();
        await s.write(new Uint8Array([byte, 1, 2, 3]));
        await expect(within(s.read(), 5_000, `reset of kind ${byte}`)).rejects.toBeInstanceOf(StreamResetError);
      }
      const ok = await conn.openBi();
      await ok.write(new Uint8Array([STREAM_KIND_BYTES.control, 42]));
      await within(waitFor(() => got.length === 1), 5_000, 'control stream handled');
      expect(got[0]).toEqual(new Uint8Array([42]));
      expect(b.connection(raw.id)).toBeDefined();
    });

    describe('admission', () => {
      /** A gated endpoint `b` (the mesh's default), a dial to it, and b's side of the connection. */
      async function gated(init: MeshEndpointInit = {}): Promise<{ a: MeshEndpoint; b: MeshEndpoint; ab: MeshConnection; ba: MeshConnection }> {
        const a = await ep();
        const b = await ep(init);
        const ab = await a.dial(b.id, b.addrs());
        const ba = (await within(b.accept(), 5_000, 'accept'))!;
        return { a, b, ab, ba };
      }

      it('serves only the control stream before the verdict; an early stream is served once admitted', async () => {
        const handled: string[] = [];
        const b0 = { control: 0 };
        const { b, ab, ba } = await gated();
        b.handle('control', (s) => {
          b0.control++;
          echo(s);
        });
        b.handle('rpc', (s, c) => {
          handled.push(`rpc admitted=${c.admitted}`);
          echo(s);
        });
        expect(ba.admitted).toBe(false);
        const early = await ab.openStream('rpc');
        await early.write(new Uint8Array([7]));
        const control = await ab.openStream('control');
        await control.write(new Uint8Array([1]));
        expect(await within(control.read(), 5_000, 'control echo')).toEqual(new Uint8Array([1]));
        await sleep(300);
        expect(handled).toEqual([]);
        b.admit(ba);
        expect(ba.admitted).toBe(true);
        expect(await within(early.read(), 5_000, 'the early stream, served')).toEqual(new Uint8Array([7]));
        expect(handled).toEqual(['rpc admitted=true']);
        const later = await ab.openStream('rpc');
        await later.write(new Uint8Array([8]));
        expect(await within(later.read(), 5_000, 'a later stream')).toEqual(new Uint8Array([8]));
      });

      it('a refusal resets the waiting streams at once and every later one but control', async () => {
        const { b, ab, ba } = await gated();
        const handled: string[] = [];
        for (const kind of ['rpc', 'http', 'direct'] as const) b.handle(kind, (s) => handled.push(s.kind));
        let controls = 0;
        b.handle('control', () => controls++);
        const waiting = await Promise.all((['rpc', 'http', 'direct'] as const).map((k) => ab.openStream(k)));
        for (const s of waiting) await s.write(new Uint8Array([1]));
        await sleep(100);
        b.refuse(ba, 'wrong mesh secret');
        for (const s of waiting) {
          const err = await within(s.read(), 5_000, 'reset of a waiting stream').catch((e: unknown) => e);
          expect(err).toBeInstanceOf(StreamResetError);
          expect((err as StreamResetError).code).toBe(RESET_CODES.notAdmitted);
        }
        const late = await ab.openStream('http');
        await late.write(new Uint8Array([1]));
        await expect(within(late.read(), 5_000, 'reset of a later stream')).rejects.toBeInstanceOf(StreamResetError);
        const c = await ab.openStream('control');
        await c.write(new Uint8Array([1]));
        await within(waitFor(() => controls === 1), 5_000, 'control still handled');
        expect(handled).toEqual([]);
        b.admit(ba); // a verdict is final
        expect(ba.admitted).toBe(false);
      });

      it('an early stream waits admissionWaitMs at most; a connection never admitted is closed', async () => {
        const { b, ab } = await gated({ admissionWaitMs: 300, admissionTimeoutMs: 1_500 });
        const handled: string[] = [];
        b.handle('http', (s) => handled.push(s.kind));
        const s = await ab.openStream('http');
        await s.write(new Uint8Array([1]));
        const t0 = performance.now();
        const err = await within(s.read(), 5_000, 'reset after the wait').catch((e: unknown) => e);
        expect((err as StreamResetError).code).toBe(RESET_CODES.notAdmitted);
        expect(performance.now() - t0).toBeLessThan(4_000);
        const info = await within(ab.closed, 8_000, 'closed as not admitted');
        expect(info).toMatchObject({ code: CLOSE_CODES.notAdmitted, byPeer: true });
        expect(handled).toEqual([]);
      });

      it('bounds the streams that wait for a verdict', async () => {
        const { b, ab } = await gated({ maxEarlyStreams: 4 });
        b.handle('rpc', () => {});
        const streams = await Promise.all(Array.from({ length: 10 }, () => ab.openStream('rpc')));
        // A stream reset before this write makes it fail: that is the bound at work.
        for (const s of streams) await s.write(new Uint8Array([1])).catch(() => {});
        const outcomes = await Promise.all(
          streams.map((s) =>
            within(s.read(), 1_500, 'read').then(
              () => 'data',
              (e: unknown) => (e instanceof StreamResetError ? `reset ${e.code}` : 'waiting'),
            ),
          ),
        );
        expect(outcomes.filter((o) => o === `reset ${RESET_CODES.notAdmitted}`).length).toBeGreaterThanOrEqual(6);
        expect(outcomes).not.toContain('data');
      });

      it('bounds unadmitted connections per remote address and in total; admission frees a slot', async () => {
        const b = await ep({ maxHandshakesPerAddress: 3, maxHandshakes: 100 });
        b.handle('control', () => {});
        const raws = await Promise.all(Array.from({ length: 6 }, () => backend.rawEndpoint()));
        for (const r of raws) cleanups.push(() => r.close());
        const conns = [];
        for (const r of raws.slice(0, 5)) {
          conns.push(await r.dial(b.id, b.addrs(), new AbortController().signal));
          await sleep(50);
        }
        const closedSoon = await Promise.all(conns.map((c) => Promise.race([c.closed, sleep(1_000).then(() => null)])));
        expect(closedSoon.slice(0, 3)).toEqual([null, null, null]);
        for (const info of closedSoon.slice(3)) expect(info).toMatchObject({ code: CLOSE_CODES.busy, byPeer: true });
        // One of the three is admitted: a new connection from the same address fits again.
        const first = (await within(b.accept(), 5_000, 'accept'))!;
        b.admit(first);
        const sixth = await raws[5]!.dial(b.id, b.addrs(), new AbortController().signal);
        expect(await Promise.race([sixth.closed, sleep(1_000).then(() => null)])).toBeNull();
        for (const c of [...conns, sixth]) c.close(0, 'done');

        const c = await ep({ maxHandshakesPerAddress: 100, maxHandshakes: 2 });
        const more = await Promise.all(raws.slice(0, 3).map((r) => r.dial(c.id, c.addrs(), new AbortController().signal)));
        const total = await Promise.all(more.map((x) => Promise.race([x.closed, sleep(1_000).then(() => null)])));
        expect(total.filter((x) => x === null).length).toBe(2);
        expect(total.find((x) => x !== null)).toMatchObject({ code: CLOSE_CODES.busy });
        for (const x of more) x.close(0, 'done');
      });
    });
  });
}

async function waitFor(cond: () => boolean): Promise<void> {
  while (!cond()) await sleep(5);
}
