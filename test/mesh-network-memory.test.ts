// The network layer over the in-memory transport: fast, deterministic checks of the paths that real sockets
// make slow or flaky to reach (hello timeout, a peer that never reads, a restarted peer), and the actor.
import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { pino, type Logger } from 'pino';
import { assign, createActor, sendTo, setup } from 'xstate';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { MeshNetwork, type MeshNetworkInit } from '../src/io/mesh/mesh-network.ts';
import { encodeFrame } from '../src/io/wire/frame-codec.ts';
import { makeHello } from '../src/io/wire/mesh-auth.ts';
import { createMeshSecret } from '../src/io/wire/invite-token.ts';
import { createMeshNetworkLogic } from '../src/actors/mesh-network.actor.ts';
import type { NetworkCommand, NetworkEvent } from '../src/machines/protocol.ts';
import { until } from './harness/proc.ts';

type Log = { level: number; msg: string; [k: string]: unknown };
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function logSink(): { logs: Log[]; logger: Logger } {
  const logs: Log[] = [];
  return { logs, logger: pino({ level: 'debug' }, { write: (l: string) => void logs.push(JSON.parse(l)) }) };
}

function node(world: MemoryNetwork, secret: Uint8Array, opts: Partial<MeshNetworkInit> & { id?: string } = {}) {
  const { id, ...init } = opts;
  const endpoint = world.createEndpoint(id ? { id } : {});
  const { logs, logger } = logSink();
  const net = new MeshNetwork({ secret, hello: { role: 'auto', vramBytes: 1, model: null }, closeLingerMs: 50, ...init }, { endpoint, logger });
  const events: NetworkEvent[] = [];
  net.start((e) => events.push(e));
  cleanups.push(async () => {
    await net.stop();
    await endpoint.close();
  });
  return { id: endpoint.id, endpoint, net, events, logs };
}

const waitEvent = (events: NetworkEvent[], pred: (e: NetworkEvent) => boolean, ms = 3_000) => until(() => events.find(pred), ms, 'a network event');

describe('mesh network over the memory transport', () => {
  it('a stream from an admitted peer that arrives before our verdict waits for it and is then served', async () => {
    const world = new MemoryNetwork();
    const secret = createMeshSecret();
    const a = node(world, secret);
    const b = node(world, secret);
    // a's verdict on b comes late (as on a slow machine): b admits a first and opens an rpc stream at once.
    const admit = a.endpoint.admit.bind(a.endpoint);
    let admittedAt = 0;
    a.endpoint.admit = (c) => {
      setTimeout(() => {
        admittedAt = performance.now();
        admit(c);
      }, 300);
    };
    const served: { at: number; admitted: boolean; bytes: number[] }[] = [];
    a.endpoint.handle('rpc', (stream, conn) => {
      void stream.read().then((c) => served.push({ at: performance.now(), admitted: conn.admitted, bytes: [...(c ?? [])] }));
    });
    let openedAt = 0;
    a.net.execute({ type: 'net.dial', id: b.id, addrs: b.endpoint.addrs() });
    await waitEvent(b.events, (e) => e.type === 'net.peer.connected');
    const s = await b.endpoint.connection(a.id)!.openStream('rpc');
    openedAt = performance.now();
    await s.write(new Uint8Array([5, 6]));
    await until(() => (served.length > 0 ? true : undefined), 5_000, 'the early stream served');
    expect(served[0]!.bytes).toEqual([5, 6]);
    expect(served[0]!.admitted).toBe(true);
    expect(admittedAt).toBeGreaterThan(openedAt);
    expect(served[0]!.at).toBeGreaterThanOrEqual(admittedAt);
  });

  it('a stranger gets no stream served: without a hello, or with a hello under a wrong secret', async () => {
    const world = new MemoryNetwork();
    const target = node(world, createMeshSecret(), { helloTimeoutMs: 500 });
    const handled: string[] = [];
    for (const kind of ['rpc', 'http', 'direct'] as const) target.endpoint.handle(kind, (st) => handled.push(st.kind));
    for (const withHello of [false, true]) {
      const stranger = world.createEndpoint({ admission: 'open' });
      cleanups.push(() => stranger.close());
      const conn = await stranger.dial(target.id, target.endpoint.addrs());
      const streams = await Promise.all((['rpc', 'http', 'direct'] as const).map((k) => conn.openStream(k)));
      for (const st of streams) await st.write(new Uint8Array([0, 1, 2])).catch(() => {});
      if (withHello) {
        const control = await conn.openStream('control');
        await control.write(encodeFrame(makeHello({ role: 'auto', vramBytes: 1, model: null }, createMeshSecret(), stranger.id, target.id)));
      }
      for (const st of streams) await expect(st.read()).rejects.toThrow(/reset|closed/);
      await conn.closed;
    }
    expect(handled).toEqual([]);
    expect(target.logs.some((l) => l.msg.startsWith('refusing peer: wrong mesh secret'))).toBe(true);
    expect(target.logs.some((l) => /no valid hello/.test(l.msg))).toBe(true);
  });

  it('closes a connection that never sends a hello, and says why', async () => {
    const world = new MemoryNetwork();
    const a = node(world, createMeshSecret(), { helloTimeoutMs: 100 });
    const mute = world.createEndpoint();
    cleanups.push(() => mute.close());
    const conn = await mute.dial(a.id, []);
    await conn.openStream('control');
    const info = await conn.closed;
    expect(info.reason).toMatch(/no valid hello within 100 ms/);
    expect(a.logs.some((l) => l.level === 40 && l.msg === 'closing peer: no valid hello within 100 ms')).toBe(true);
    expect(a.events).toEqual([]); // never admitted, never reported
  });

  it('closes a peer that stops reading once its queue passes the cap, and reports it', async () => {
    const world = new MemoryNetwork({ streamWindow: 4 * 1024 });
    const secret = createMeshSecret();
    const a = node(world, secret, { maxQueuedBytes: 64 * 1024 });
    // A peer that says a valid hello, then never reads again.
    const stuck = world.createEndpoint();
    cleanups.push(() => stuck.close());
    const conn = await stuck.dial(a.id, []);
    const stream = await conn.openStream('control');
    await stream.write(encodeFrame(makeHello({ role: 'auto', vramBytes: 0, model: null }, secret, stuck.id, a.id)));
    await waitEvent(a.events, (e) => e.type === 'net.peer.connected');
    const big = { type: 'rpc-ready' as const, planId: 'x'.repeat(200) };
    for (let i = 0; i < 1000; i++) a.net.execute({ type: 'net.send', to: stuck.id, message: big });
    const ev = await waitEvent(a.events, (e) => e.type === 'net.peer.disconnected');
    expect(ev).toMatchObject({ id: stuck.id, reason: expect.stringMatching(/peer is not reading: over 65536 bytes queued/) });
    expect(a.net.peers()).toEqual([]);
  });

  it('a restarted peer (same id, new connection) replaces the old session', async () => {
    const world = new MemoryNetwork({ idleTimeoutMs: 60_000 });
    const secret = createMeshSecret();
    const a = node(world, secret);
    const bId = 'b'.repeat(64);
    const b1 = node(world, secret, { id: bId });
    b1.net.execute({ type: 'net.dial', id: a.id, addrs: [] });
    await waitEvent(a.events, (e) => e.type === 'net.peer.connected');
    world.kill(bId); // SIGKILL: a hears nothing
    const b2 = node(world, secret, { id: bId });
    b2.net.execute({ type: 'net.dial', id: a.id, addrs: [] });
    await waitEvent(b2.events, (e) => e.type === 'net.peer.connected');
    await until(() => (a.events.filter((e) => e.type === 'net.peer.connected').length === 2 ? true : undefined), 3_000, 'second connect');
    expect(a.events.filter((e) => e.type !== 'net.message').map((e) => [e.type, 'reason' in e ? e.reason : ''])).toEqual([
      ['net.peer.connected', ''],
      ['net.peer.disconnected', expect.stringMatching(/replaced by a newer connection/)],
      ['net.peer.connected', ''],
    ]);
    expect(a.net.peers()).toEqual([bId]);
  });

  it('dial of a connected peer answers net.peer.connected again; sending leaving closes', async () => {
    const world = new MemoryNetwork();
    const secret = createMeshSecret();
    const a = node(world, secret);
    const b = node(world, secret);
    a.net.execute({ type: 'net.dial', id: b.id, addrs: [] });
    await waitEvent(a.events, (e) => e.type === 'net.peer.connected');
    a.net.execute({ type: 'net.dial', id: b.id, addrs: [] });
    await until(() => (a.events.filter((e) => e.type === 'net.peer.connected').length === 2 ? true : undefined), 1_000, 'connected again');
    a.net.execute({ type: 'net.send', to: b.id, message: { type: 'leaving', reason: 'bye' } });
    const ev = await waitEvent(b.events, (e) => e.type === 'net.peer.disconnected');
    expect(ev).toEqual({ type: 'net.peer.disconnected', id: a.id, reason: 'left: bye' });
    await waitEvent(a.events, (e) => e.type === 'net.peer.disconnected');
    expect(a.net.peers()).toEqual([]);
  });

  it('a dial right after a close waits for the old connection and connects afresh', async () => {
    const world = new MemoryNetwork();
    const secret = createMeshSecret();
    const a = node(world, secret, { closeLingerMs: 100 });
    const b = node(world, secret);
    a.net.execute({ type: 'net.dial', id: b.id, addrs: [] });
    await waitEvent(a.events, (e) => e.type === 'net.peer.connected');
    a.net.execute({ type: 'net.close', id: b.id, reason: 'flap' });
    a.net.execute({ type: 'net.dial', id: b.id, addrs: [] });
    await until(() => (a.events.filter((e) => e.type === 'net.peer.connected').length === 2 ? true : undefined), 3_000, 'reconnected');
    expect(a.events.filter((e) => e.type !== 'net.message').map((e) => e.type)).toEqual([
      'net.peer.connected',
      'net.peer.disconnected',
      'net.peer.connected',
    ]);
    await until(() => (b.net.peers().length === 1 ? true : undefined), 3_000, 'b sees a again');
    a.net.execute({ type: 'net.send', to: b.id, message: { type: 'heartbeat', n: 77 } });
    await waitEvent(b.events, (e) => e.type === 'net.message' && e.message.type === 'heartbeat' && e.message.n === 77);
  });

  it('the actor forwards commands and events, and says leaving to every peer when it stops', async () => {
    const world = new MemoryNetwork();
    const secret = createMeshSecret();
    const b = node(world, secret);
    const endpoint = world.createEndpoint();
    cleanups.push(() => endpoint.close());
    const { logger } = logSink();
    const parent = setup({
      types: { context: {} as { seen: NetworkEvent[] }, events: {} as NetworkEvent | { type: 'cmd'; command: NetworkCommand } },
      actors: { network: createMeshNetworkLogic({ secret, hello: { role: 'auto', vramBytes: 0, model: null }, closeLingerMs: 50 }, { endpoint, logger }) },
    }).createMachine({
      context: { seen: [] },
      invoke: { id: 'network', src: 'network', input: { self: endpoint.id } },
      on: {
        cmd: { actions: sendTo('network', ({ event }) => event.command) },
        'net.peer.connected': { actions: assign({ seen: ({ context, event }) => [...context.seen, event] }) },
        'net.peer.disconnected': { actions: assign({ seen: ({ context, event }) => [...context.seen, event] }) },
        'net.message': { actions: assign({ seen: ({ context, event }) => [...context.seen, event] }) },
      },
    });
    const actor = createActor(parent).start();
    actor.send({ type: 'cmd', command: { type: 'net.dial', id: b.id, addrs: [] } });
    await until(() => actor.getSnapshot().context.seen.find((e) => e.type === 'net.peer.connected'), 3_000, 'connected');
    await until(() => actor.getSnapshot().context.seen.find((e) => e.type === 'net.message' && e.message.type === 'hello'), 3_000, 'hello');
    actor.send({ type: 'cmd', command: { type: 'net.send', to: b.id, message: { type: 'heartbeat', n: 5 } } });
    await waitEvent(b.events, (e) => e.type === 'net.message' && e.message.type === 'heartbeat');
    actor.stop();
    const ev = await waitEvent(b.events, (e) => e.type === 'net.peer.disconnected');
    expect(ev).toEqual({ type: 'net.peer.disconnected', id: endpoint.id, reason: 'left: node stopping' });
  });

  it('fuzz: whatever a peer writes on its control stream affects only that peer, and every session it opened ends once', async () => {
    const world = new MemoryNetwork();
    const secret = createMeshSecret();
    const target = node(world, secret, { helloTimeoutMs: 200 });
    const friend = node(world, secret);
    friend.net.execute({ type: 'net.dial', id: target.id, addrs: [] });
    await waitEvent(target.events, (e) => e.type === 'net.peer.connected' && e.id === friend.id);
    await waitEvent(friend.events, (e) => e.type === 'net.peer.connected' && e.id === target.id);
    const packr = new Packr({ useRecords: false });
    const frameOf = (v: unknown): Uint8Array => {
      const body = packr.pack(v);
      const f = new Uint8Array(4 + body.length);
      new DataView(f.buffer).setUint32(0, body.length);
      f.set(body, 4);
      return f;
    };
    const anyFrame = fc.oneof(
      fc.uint8Array({ minLength: 1, maxLength: 200 }),
      fc.anything().map(frameOf),
      fc.record({ type: fc.constantFrom('hello', 'gossip', 'heartbeat', 'heartbeat-ack', 'leaving', 'rpc-ready', 'x'), n: fc.anything(), planId: fc.anything(), reason: fc.anything() }).map(frameOf),
      fc.constantFrom({ type: 'heartbeat', n: 1 }, { type: 'rpc-ready', planId: 'p' }, { type: 'leaving', reason: 'fuzz' }).map(frameOf),
    );
    let attackers = 0;
    await fc.assert(
      fc.asyncProperty(fc.boolean(), fc.array(anyFrame, { minLength: 1, maxLength: 5 }), fc.boolean(), async (sayHello, frames, finish) => {
        const attacker = world.createEndpoint();
        attackers++;
        try {
          const conn = await attacker.dial(target.id, []);
          const stream = await conn.openStream('control');
          try {
            if (sayHello) await stream.write(encodeFrame(makeHello({ role: 'auto', vramBytes: 0, model: null }, secret, attacker.id, target.id)));
            for (const f of frames) await stream.write(f);
            if (finish) await stream.finish();
          } catch {
            // closed by the target already
          }
          // Every run ends: the target closes on a bad frame, at the end of our stream, or after the hello timeout;
          // a run of only valid frames after a valid hello stays admitted until we hang up.
          const info = await Promise.race([conn.closed, new Promise<null>((r) => setTimeout(() => r(null), 400))]);
          if (info === null) conn.close('run over');
        } finally {
          await attacker.close();
        }
      }),
      { numRuns: 150 },
    );
    // Every attacker session the node heard of has ended, each exactly once.
    await until(() => (target.net.peers().length === 1 ? true : undefined), 3_000, 'attackers gone');
    const others = target.events.filter((e) => ('id' in e ? e.id : 'from' in e ? e.from : null) !== friend.id);
    const up = others.filter((e) => e.type === 'net.peer.connected').length;
    const down = others.filter((e) => e.type === 'net.peer.disconnected').length;
    expect(up).toBe(down);
    expect(target.net.peers()).toEqual([friend.id]);
    expect(target.logs.filter((l) => l.level >= 50)).toEqual([]);
    // The friend noticed nothing and still talks to the target.
    friend.net.execute({ type: 'net.send', to: target.id, message: { type: 'heartbeat', n: 4242 } });
    await waitEvent(target.events, (e) => e.type === 'net.message' && e.message.type === 'heartbeat' && e.message.n === 4242);
    expect(friend.events.map((e) => e.type)).toEqual(['net.peer.connected', 'net.message']);
    expect(attackers).toBe(150);
  });
});
