// The network layer over real iroh endpoints on loopback, in one process: admission from a token,
// refusals logged on both sides, graceful close, dial timeouts.
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { MeshNetwork, type MeshNetworkInit } from '../src/io/mesh/mesh-network.ts';
import { createMeshId, createMeshSecret, decodeInviteToken, encodeInviteToken } from '../src/io/wire/invite-token.ts';
import { asEndpointId, type EndpointId } from '../src/machines/mesh-types.ts';
import type { MeshEndpoint } from '../src/io/transport/transport.ts';
import type { NetworkEvent } from '../src/machines/protocol.ts';
import { PROTOCOL_VERSION } from '../src/machines/mesh-types.ts';

interface TestNode {
  readonly id: EndpointId;
  readonly endpoint: MeshEndpoint;
  readonly net: MeshNetwork;
  readonly events: NetworkEvent[];
  readonly logs: { level: number; msg: string; [k: string]: unknown }[];
  waitEvent(pred: (e: NetworkEvent) => boolean, ms?: number): Promise<NetworkEvent>;
  waitLog(pred: (l: { msg: string }) => boolean, ms?: number): Promise<void>;
}

const nodes: TestNode[] = [];
afterEach(async () => {
  await Promise.all(nodes.splice(0).map(async (n) => {
    await n.net.stop();
    await n.endpoint.close();
  }));
});

async function until<T>(f: () => T | undefined, ms: number, what: string): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function startNode(secret: Uint8Array, opts: Partial<MeshNetworkInit> = {}): Promise<TestNode> {
  const logs: TestNode['logs'] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
  const endpoint = await createIrohEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1', relay: 'none' });
  const net = new MeshNetwork(
    { secret, hello: { role: 'auto', vramBytes: 1e9, model: null }, dialTimeoutMs: 2_000, closeLingerMs: 200, ...opts },
    { endpoint, logger },
  );
  const events: NetworkEvent[] = [];
  net.start((e) => events.push(e));
  const node: TestNode = {
    id: endpoint.id,
    endpoint,
    net,
    events,
    logs,
    waitEvent: (pred, ms = 5_000) => until(() => events.find(pred), ms, 'a network event'),
    waitLog: (pred, ms = 5_000) => until(() => (logs.some(pred) ? true : undefined), ms, 'a log line').then(() => {}),
  };
  nodes.push(node);
  return node;
}

function tokenOf(n: TestNode, secret: Uint8Array): string {
  return encodeInviteToken({ meshId: createMeshId(), secret, inviter: n.id, addrs: n.endpoint.addrs() });
}

describe('mesh network (iroh on loopback, one process)', () => {
  it('admits a node that joins with the token, and carries messages both ways', async () => {
    const secret = createMeshSecret();
    const a = await startNode(secret);
    const invite = decodeInviteToken(tokenOf(a, secret));
    const b = await startNode(invite.secret);
    b.net.execute({ type: 'net.dial', id: invite.inviter, addrs: invite.addrs });
    await b.waitEvent((e) => e.type === 'net.peer.connected' && e.id === a.id);
    await a.waitEvent((e) => e.type === 'net.peer.connected' && e.id === b.id);
    const hello = await a.waitEvent((e) => e.type === 'net.message' && e.message.type === 'hello');
    expect(hello).toMatchObject({ from: b.id, message: { type: 'hello', id: b.id, role: 'auto' } });
    b.net.execute({ type: 'net.send', to: a.id, message: { type: 'heartbeat', n: 7 } });
    a.net.execute({ type: 'net.send', to: b.id, message: { type: 'heartbeat-ack', n: 7 } });
    await a.waitEvent((e) => e.type === 'net.message' && e.message.type === 'heartbeat' && e.message.n === 7);
    await b.waitEvent((e) => e.type === 'net.message' && e.message.type === 'heartbeat-ack');
    expect(a.net.peers()).toEqual([b.id]);
    expect(b.net.peers()).toEqual([a.id]);
    // Dialing an admitted peer again is harmless.
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await new Promise((r) => setTimeout(r, 200));
    expect(b.events.filter((e) => e.type === 'net.peer.disconnected')).toEqual([]);
  });

  it('refuses a node with the wrong secret, and both sides log why', async () => {
    const a = await startNode(createMeshSecret());
    const b = await startNode(createMeshSecret());
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    const ev = await b.waitEvent((e) => e.type === 'net.peer.disconnected');
    expect(ev).toMatchObject({ id: a.id, reason: expect.stringMatching(/wrong mesh secret/) });
    // The acceptor refuses the dialer's hello and says why; the dialer logs that reason. The acceptor never
    // sent its own hello (it answers only a verified one), so the dialer has nothing of its own to refuse.
    await a.waitLog((l) => /^refusing peer: wrong mesh secret/.test(l.msg));
    await b.waitLog((l) => /^peer refused the connection: refused: wrong mesh secret/.test(l.msg));
    expect(b.logs.filter((l) => /^refusing peer/.test(l.msg))).toEqual([]);
    expect(a.events.filter((e) => e.type === 'net.peer.connected')).toEqual([]);
    expect(b.events.filter((e) => e.type === 'net.peer.connected')).toEqual([]);
    expect(a.net.peers()).toEqual([]);
  });

  it('refuses an incompatible protocol version with a reason on both sides', async () => {
    const secret = createMeshSecret();
    const a = await startNode(secret);
    const b = await startNode(secret, { protocolVersion: 99 });
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    const ev = await b.waitEvent((e) => e.type === 'net.peer.disconnected');
    expect(ev).toMatchObject({ reason: expect.stringMatching(/incompatible protocol version/) });
    // Both logs name both versions and the node to upgrade (the older one): a from its own check, b from a's
    // refusal (the acceptor answers only a verified hello, so b never checks one of a's).
    const v = PROTOCOL_VERSION;
    const aShort = a.id.slice(0, 10);
    await a.waitLog((l) => new RegExp(`^refusing peer: incompatible protocol version: peer \\w+ speaks 99, node ${aShort} speaks ${v}: upgrade node ${aShort} \\(the older one\\)`).test(l.msg));
    await b.waitLog((l) => new RegExp(`^peer refused the connection: refused: incompatible protocol version: peer \\w+ speaks 99, node ${aShort} speaks ${v}: upgrade node ${aShort}`).test(l.msg));
    expect(a.events.filter((e) => e.type === 'net.peer.connected')).toEqual([]);
  });

  it('a graceful close is seen at once on the other side, with its reason', async () => {
    const secret = createMeshSecret();
    const a = await startNode(secret);
    const b = await startNode(secret);
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await a.waitEvent((e) => e.type === 'net.peer.connected');
    await b.waitEvent((e) => e.type === 'net.peer.connected');
    a.net.execute({ type: 'net.close', id: b.id, reason: 'going to lunch' });
    // Far below heartbeat bounds or QUIC's 30 s idle timeout.
    const ev = await b.waitEvent((e) => e.type === 'net.peer.disconnected', 1_500);
    expect(ev).toMatchObject({ id: a.id, reason: 'left: going to lunch' });
    expect(b.events).toContainEqual({ type: 'net.message', from: a.id, message: { type: 'leaving', reason: 'going to lunch' } });
    await a.waitEvent((e) => e.type === 'net.peer.disconnected' && e.reason === 'closed: going to lunch');
    expect(a.net.peers()).toEqual([]);
    expect(b.net.peers()).toEqual([]);
  });

  it('a dial to a dead address fails within the dial timeout, and sends to unknown peers are dropped', async () => {
    const a = await startNode(createMeshSecret(), { dialTimeoutMs: 800 });
    const ghost = asEndpointId(randomBytes(32).toString('hex'));
    const t0 = Date.now();
    a.net.execute({ type: 'net.dial', id: ghost, addrs: ['127.0.0.1:9'] });
    const ev = await a.waitEvent((e) => e.type === 'net.peer.disconnected', 10_000);
    expect(ev).toMatchObject({ id: ghost, reason: expect.stringMatching(/^dial failed/) });
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(() => a.net.execute({ type: 'net.send', to: ghost, message: { type: 'heartbeat', n: 1 } })).not.toThrow();
    expect(() => a.net.execute({ type: 'bogus' } as never)).not.toThrow();
  });

  it('both dialing at once ends with one admitted connection', async () => {
    const secret = createMeshSecret();
    const a = await startNode(secret);
    const b = await startNode(secret);
    a.net.execute({ type: 'net.dial', id: b.id, addrs: b.endpoint.addrs() });
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await a.waitEvent((e) => e.type === 'net.peer.connected');
    await b.waitEvent((e) => e.type === 'net.peer.connected');
    await new Promise((r) => setTimeout(r, 500));
    expect(a.net.peers()).toEqual([b.id]);
    expect(b.net.peers()).toEqual([a.id]);
    expect([...a.events, ...b.events].filter((e) => e.type === 'net.peer.disconnected')).toEqual([]);
    b.net.execute({ type: 'net.send', to: a.id, message: { type: 'heartbeat', n: 1 } });
    await a.waitEvent((e) => e.type === 'net.message' && e.message.type === 'heartbeat');
  });
});
