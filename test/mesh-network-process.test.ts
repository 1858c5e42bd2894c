// The network layer in separate processes (test/harness/net-peer.ts) over real iroh on loopback: admission
// from a token, a wrong secret refused with the reason in both logs, a graceful close seen at once, and a
// fuzzer on a live node's control stream that neither crashes it nor disturbs its other peer.
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { encodeFrame } from '../src/io/wire/frame-codec.ts';
import { createMeshSecret, decodeInviteToken, encodeInviteToken } from '../src/io/wire/invite-token.ts';
import { makeHello } from '../src/io/wire/mesh-auth.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';
import { asEndpointId, type EndpointId } from '../src/machines/mesh-types.ts';
import type { MeshMessage, NetworkEvent } from '../src/machines/protocol.ts';
import { HarnessProc, until } from './harness/proc.ts';

const HARNESS = './net-peer.ts';
const procs: HarnessProc[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.stop()));
});

interface Ready {
  ev: 'ready';
  id: EndpointId;
  addrs: string[];
  token: string;
}

async function startPeer(config: Record<string, unknown>): Promise<{ p: HarnessProc; ready: Ready }> {
  const p = new HarnessProc(HARNESS, config);
  procs.push(p);
  const ready = await p.waitLine<Ready>((l) => l.ev === 'ready', 20_000, 'ready');
  return { p, ready };
}

const netEvents = (p: HarnessProc): NetworkEvent[] => p.lines.filter((l) => l.ev === 'net').map((l) => l.event as NetworkEvent);
const waitNet = (p: HarnessProc, pred: (e: NetworkEvent) => boolean, ms = 10_000): Promise<NetworkEvent> =>
  until(() => netEvents(p).find(pred), ms, 'a network event');

describe('mesh network in separate processes', () => {
  it('two nodes admit each other from a token', async () => {
    const a = await startPeer({});
    const b = await startPeer({ token: a.ready.token, join: true });
    await waitNet(a.p, (e) => e.type === 'net.peer.connected' && e.id === b.ready.id);
    await waitNet(b.p, (e) => e.type === 'net.peer.connected' && e.id === a.ready.id);
    b.p.send({ cmd: 'net', command: { type: 'net.send', to: a.ready.id, message: { type: 'heartbeat', n: 42 } } });
    await waitNet(a.p, (e) => e.type === 'net.message' && e.from === b.ready.id && e.message.type === 'heartbeat' && e.message.n === 42);
    await a.p.waitLog((l) => l.msg === 'peer admitted');
    await b.p.waitLog((l) => l.msg === 'peer admitted');
  });

  it('a token with the wrong secret is refused, with the reason logged on both sides', async () => {
    const a = await startPeer({});
    const forged = encodeInviteToken({ ...decodeInviteToken(a.ready.token), secret: createMeshSecret() });
    const b = await startPeer({ token: forged, join: true });
    const ev = await waitNet(b.p, (e) => e.type === 'net.peer.disconnected');
    expect(ev).toMatchObject({ id: a.ready.id, reason: expect.stringMatching(/refused.*wrong mesh secret/) });
    // The acceptor refuses and says why; the dialer logs the reason (it never gets a hello to refuse itself:
    // the acceptor answers only a verified hello).
    await a.p.waitLog((l) => l.level === 40 && l.msg.startsWith('refusing peer: wrong mesh secret'));
    await b.p.waitLog((l) => l.level === 40 && l.msg.startsWith('peer refused the connection: refused: wrong mesh secret'));
    expect(netEvents(a.p).filter((e) => e.type === 'net.peer.connected')).toEqual([]);
    expect(netEvents(b.p).filter((e) => e.type === 'net.peer.connected')).toEqual([]);
  });

  it('a graceful net.close is seen at once on the other side', async () => {
    const a = await startPeer({});
    const b = await startPeer({ token: a.ready.token, join: true });
    await waitNet(a.p, (e) => e.type === 'net.peer.connected');
    await waitNet(b.p, (e) => e.type === 'net.peer.connected');
    const t0 = Date.now();
    a.p.send({ cmd: 'net', command: { type: 'net.close', id: b.ready.id, reason: 'maintenance' } });
    // Generous for a loaded 2-core machine, and still far below heartbeats or QUIC's 30 s idle timeout.
    const ev = await waitNet(b.p, (e) => e.type === 'net.peer.disconnected', 3_000);
    expect(ev).toEqual({ type: 'net.peer.disconnected', id: a.ready.id, reason: 'left: maintenance' });
    expect(Date.now() - t0).toBeLessThan(3_000);
    await b.p.waitLog((l) => l.msg === 'peer is leaving: maintenance');
  });

  describe('fuzzing a live node', () => {
    let attacker: MeshEndpoint | undefined;
    afterAll(async () => {
      await attacker?.close();
    });

    it('random and mutated frames on its control stream never crash it, and its other peer notices nothing', async () => {
      const target = await startPeer({ helloTimeoutMs: 2_000, logLevel: 'info' });
      const friend = await startPeer({ token: target.ready.token, join: true, logLevel: 'info' });
      await waitNet(target.p, (e) => e.type === 'net.peer.connected' && e.id === friend.ready.id);
      await waitNet(friend.p, (e) => e.type === 'net.peer.connected' && e.id === target.ready.id);

      const invite = decodeInviteToken(target.ready.token);
      attacker = await createIrohEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1', relay: 'none' });
      const me = attacker.id;
      const hello = makeHello({ role: 'auto', vramBytes: 0, model: null }, invite.secret, me, invite.inviter);
      const packr = new Packr({ useRecords: false });
      const frameOf = (value: unknown): Uint8Array => {
        const body = packr.pack(value);
        const f = new Uint8Array(4 + body.length);
        new DataView(f.buffer).setUint32(0, body.length);
        f.set(body, 4);
        return f;
      };
      const announcement = {
        id: invite.inviter,
        epoch: 1,
        seq: 2,
        name: 'n',
        role: 'auto',
        vramBytes: 1,
        model: { name: 'm', bytes: 10, fingerprint: 'ab' },
        version: 1,
        serving: false,
        addrs: ['127.0.0.1:1'],
        connectedTo: [],
      };
      const valid: MeshMessage[] = [
        hello,
        { type: 'heartbeat', n: 1 },
        { type: 'heartbeat-ack', n: 2 },
        { type: 'gossip', announcements: [announcement as never] },
        { type: 'rpc-ready', planId: 'p' },
      ];
      const validFrame = fc.constantFrom(...valid).map((m) => encodeFrame(m));
      const payload = fc.oneof(
        // Noise.
        fc.uint8Array({ minLength: 1, maxLength: 3000 }),
        // A valid frame with bytes flipped.
        fc
          .tuple(validFrame, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4 }))
          .map(([f, flips]) => {
            const g = f.slice();
            for (const [i, x] of flips) g[i % g.length] = g[i % g.length]! ^ x;
            return g;
          }),
        // A valid frame cut short, or with junk after it.
        fc.tuple(validFrame, fc.nat()).map(([f, n]) => f.subarray(0, n % f.length)),
        fc.tuple(validFrame, fc.uint8Array({ minLength: 1, maxLength: 64 })).map(([f, junk]) => Uint8Array.from([...f, ...junk])),
        // Well-framed msgpack that is not a valid message: unknown types, wrong types, bad fields, any value.
        fc.anything().map((v) => frameOf(v)),
        fc.record({ type: fc.constantFrom('hello', 'gossip', 'heartbeat', 'leaving', 'rpc-ready', 'nope'), n: fc.anything(), reason: fc.anything() }).map(frameOf),
        fc.constant(frameOf({ type: 'gossip', announcements: [{ ...announcement, vramBytes: -1 }] })),
        // A length prefix far over the cap.
        fc.integer({ min: 1024 * 1024 + 1, max: 0xffffffff }).map((n) => {
          const f = new Uint8Array(8);
          new DataView(f.buffer).setUint32(0, n);
          return f;
        }),
      );

      let runs = 0;
      await fc.assert(
        fc.asyncProperty(fc.boolean(), payload, async (sayHello, bytes) => {
          runs++;
          const conn = await attacker!.dial(target.ready.id, target.ready.addrs, { timeoutMs: 5_000 });
          const stream = await conn.openStream('control');
          try {
            if (sayHello) await stream.write(encodeFrame(hello));
            await stream.write(bytes);
            await stream.finish();
          } catch {
            // The target may already have closed us: that is the point.
          }
          // The target ends every such connection: on the bad frame, or at the end of our stream.
          const closed = await Promise.race([conn.closed, new Promise<null>((r) => setTimeout(() => r(null), 4_000))]);
          if (closed === null) conn.close('fuzz run over');
          expect(target.p.alive).toBe(true);
        }),
        { numRuns: 40, seed: Number(process.env.FUZZ_SEED ?? Date.now() % 1e9) },
      );
      expect(runs).toBe(40);

      // Still alive, still serving its real peer, which noticed nothing.
      expect(target.p.alive).toBe(true);
      friend.p.send({ cmd: 'net', command: { type: 'net.send', to: target.ready.id, message: { type: 'heartbeat', n: 999 } } });
      target.p.send({ cmd: 'net', command: { type: 'net.send', to: friend.ready.id, message: { type: 'heartbeat-ack', n: 999 } } });
      await waitNet(target.p, (e) => e.type === 'net.message' && e.message.type === 'heartbeat' && e.message.n === 999);
      await waitNet(friend.p, (e) => e.type === 'net.message' && e.message.type === 'heartbeat-ack' && e.message.n === 999);
      expect(netEvents(friend.p).filter((e) => e.type !== 'net.message' || e.message.type !== 'heartbeat-ack')).toEqual([
        { type: 'net.peer.connected', id: target.ready.id, direct: true },
        expect.objectContaining({ type: 'net.message', from: target.ready.id, message: expect.objectContaining({ type: 'hello' }) }),
      ]);
      // The target told (and logged) why it closed the attacker, never crashed, never logged an error.
      const closes = target.p.logs.filter((l) => l.msg.startsWith('closing peer: ') || l.msg === 'peer disconnected' || l.msg.startsWith('refusing peer'));
      expect(closes.length).toBeGreaterThan(0);
      if (process.env.FUZZ_VERBOSE) console.log(closes.map((l) => `${l.msg} ${String(l.reason ?? "")}`.slice(0, 140)).join("\n"));
      expect(target.p.logs.filter((l) => l.level >= 50)).toEqual([]);
      expect(target.p.stderrText.filter((t) => /Error|panic/i.test(t))).toEqual([]);
      const asAttacker = netEvents(target.p).filter((e) => 'id' in e && e.id === asEndpointId(me));
      // Only admitted attacker sessions are reported, and each one that connected also disconnected.
      expect(asAttacker.filter((e) => e.type === 'net.peer.connected').length).toBe(asAttacker.filter((e) => e.type === 'net.peer.disconnected').length);
    });
  });
});
