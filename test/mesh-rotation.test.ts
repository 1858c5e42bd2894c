// Rotating the mesh secret and removing members, over the in-memory transport with real keys: a rotation
// reaches every live member (relayed verbatim), the removed member is closed out and refused by id, old
// secrets stop admitting after the grace, forged and stale rekeys change nothing, and two members rotating at
// once end on one secret.
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { MeshNetwork, type MeshNetworkInit } from '../src/io/mesh/mesh-network.ts';
import { createMeshId, createMeshSecret, decodeExpiringInvite, encodeExpiringInvite } from '../src/io/wire/invite-token.ts';
import { ed25519PrivateKey, endpointIdOf } from '../src/io/wire/announcement-signature.ts';
import { makeRekey, verifyRekey, type MeshKey } from '../src/io/wire/rekey.ts';
import { parseMessage } from '../src/io/wire/messages.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import type { NetworkEvent, RekeyMessage } from '../src/machines/protocol.ts';
import { until } from './harness/proc.ts';

type Log = { level: number; msg: string; [k: string]: unknown };
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function member(world: MemoryNetwork, meshId: string, secret: Uint8Array, init: Partial<MeshNetworkInit> = {}) {
  const signingKey = new Uint8Array(randomBytes(32));
  const endpoint = world.createEndpoint({ id: endpointIdOf(signingKey) });
  const logs: Log[] = [];
  const logger = pino({ level: 'debug' }, { write: (l: string) => void logs.push(JSON.parse(l)) });
  const keys: MeshKey[] = [];
  const net = new MeshNetwork(
    { secret, meshId, signingKey, hello: { role: 'auto', vramBytes: 1, model: null }, closeLingerMs: 50, onRekey: ({ meshId: _, ...k }) => keys.push(k), ...init },
    { endpoint, logger },
  );
  const events: NetworkEvent[] = [];
  net.start((e) => events.push(e));
  cleanups.push(async () => {
    await net.stop();
    await endpoint.close();
  });
  return { id: endpoint.id, endpoint, net, events, logs, keys, signingKey };
}
type Member = ReturnType<typeof member>;

const connected = (m: Member, id: EndpointId) => until(() => (m.net.peers().includes(id) ? true : undefined), 3_000, `${id.slice(0, 6)} admitted`);
async function link(a: Member, b: Member): Promise<void> {
  a.net.execute({ type: 'net.dial', id: b.id, addrs: b.endpoint.addrs() });
  await connected(a, b.id);
  await connected(b, a.id);
}
const disconnectedFrom = (m: Member, id: EndpointId) => until(() => (m.net.peers().includes(id) ? undefined : true), 3_000, `${id.slice(0, 6)} gone`);

describe('mesh secret rotation', () => {
  it('reaches every member (relayed), closes the removed one out for good, and voids the old secret', async () => {
    const world = new MemoryNetwork();
    const meshId = createMeshId();
    const secret = createMeshSecret();
    const [a, b, c, d] = [0, 1, 2, 3].map(() => member(world, meshId, secret));
    // a - b - d in a line (d hears the rekey only through b's relay); c linked to both a and b.
    await link(a!, b!);
    await link(b!, d!);
    await link(a!, c!);
    await link(b!, c!);

    const result = a!.net.rotate([c!.id]);
    expect(result.keyEpoch).toBe(1);
    expect(new Set(result.told)).toEqual(new Set([b!.id]));
    await until(() => (d!.keys.length === 1 ? true : undefined), 3_000, 'the relayed rekey at d');
    expect(b!.keys).toHaveLength(1);
    expect(Buffer.from(d!.keys[0]!.secret)).toEqual(Buffer.from(b!.keys[0]!.secret));
    expect(Buffer.from(a!.keys[0]!.secret)).toEqual(Buffer.from(b!.keys[0]!.secret));
    expect(Buffer.from(b!.keys[0]!.secret)).not.toEqual(Buffer.from(secret));
    expect(c!.keys).toHaveLength(0); // the removed member never holds the new secret
    expect(d!.keys[0]!.removed).toEqual([c!.id]);

    // c is closed out by a and b, and each tells its node to forget c.
    await disconnectedFrom(a!, c!.id);
    await disconnectedFrom(b!, c!.id);
    for (const m of [a!, b!, d!]) await until(() => m.events.find((e) => e.type === 'net.peers.removed' && e.ids.includes(c!.id)), 3_000, 'net.peers.removed');
    expect(c!.logs.some((l) => /removed from the mesh by/.test(l.msg) || /removed from the mesh by/.test(String(l.reason)))).toBe(true);

    // c dials back: refused by id, even after the grace.
    c!.net.execute({ type: 'net.dial', id: d!.id, addrs: d!.endpoint.addrs() });
    await until(() => d!.logs.find((l) => l.code === 'REMOVED'), 3_000, 'REMOVED refusal at d');
    expect(d!.net.peers()).not.toContain(c!.id);

    // A newcomer holding the old secret (an old token) is refused with the reason; one with the new secret is admitted.
    const stale = member(world, meshId, secret);
    stale.net.execute({ type: 'net.dial', id: d!.id, addrs: d!.endpoint.addrs() });
    await until(() => d!.logs.find((l) => /missed the rotation/.test(l.msg)), 3_000, 'the missed-rotation refusal');
    expect(d!.net.peers()).not.toContain(stale.id);
    const fresh = member(world, meshId, d!.keys[0]!.secret, { key: { keyEpoch: 1, issuer: a!.id, removed: [c!.id] } });
    await link(fresh, d!);
  });

  it('a forged or tampered rekey changes nothing and closes the peer that sent it; a stale one is ignored', async () => {
    const world = new MemoryNetwork();
    const meshId = createMeshId();
    const secret = createMeshSecret();
    const a = member(world, meshId, secret);
    const b = member(world, meshId, secret);
    await link(a, b);
    const current: MeshKey = { secret, keyEpoch: 0, issuer: null, removed: [] };
    const send = (m: RekeyMessage) => (b.net as unknown as { table: { write(s: unknown, m: unknown): void; sessions: Map<EndpointId, unknown> } }).table.write(
      (b.net as unknown as { table: { sessions: Map<EndpointId, unknown> } }).table.sessions.get(a.id),
      m,
    );
    // Signed by b's key but naming a as the issuer: the signature does not verify.
    const forged = { ...makeRekey({ key: ed25519PrivateKey(b.signingKey), issuer: b.id, meshId, current, remove: [], now: Date.now() }), issuer: a.id };
    expect(verifyRekey(meshId, forged)).toBe(false);
    send(forged);
    await until(() => a.logs.find((l) => /not validly signed/.test(String(l.reason ?? l.msg))), 3_000, 'the forged rekey refused');
    expect(a.keys).toHaveLength(0);
    expect(a.net.keyState()!.keyEpoch).toBe(0);
    await disconnectedFrom(a, b.id);

    // A validly signed rekey, then the same one again and an older epoch: taken once.
    await link(a, b);
    const first = makeRekey({ key: ed25519PrivateKey(b.signingKey), issuer: b.id, meshId, current: { ...current, keyEpoch: 4 }, remove: [], now: Date.now() });
    send(first);
    await until(() => (a.keys.length === 1 ? true : undefined), 3_000, 'the rekey taken');
    send(first);
    send(makeRekey({ key: ed25519PrivateKey(b.signingKey), issuer: b.id, meshId, current: { ...current, keyEpoch: 2 }, remove: [], now: Date.now() }));
    await new Promise((r) => setTimeout(r, 200));
    expect(a.keys).toHaveLength(1);
    expect(a.net.keyState()!.keyEpoch).toBe(5);
  });

  it('two members rotating at once end on the same secret everywhere', async () => {
    const world = new MemoryNetwork();
    const meshId = createMeshId();
    const secret = createMeshSecret();
    const ms = [0, 1, 2].map(() => member(world, meshId, secret));
    await link(ms[0]!, ms[1]!);
    await link(ms[1]!, ms[2]!);
    await link(ms[0]!, ms[2]!);
    ms[0]!.net.rotate();
    ms[2]!.net.rotate();
    const winner = [ms[0]!, ms[2]!].sort((x, y) => (x.id > y.id ? -1 : 1))[0]!;
    await until(() => (ms.every((m) => m.keys.at(-1)?.issuer === winner.id) ? true : undefined), 3_000, 'all on the winner');
    const secrets = new Set(ms.map((m) => Buffer.from(m.keys.at(-1)!.secret).toString('hex')));
    expect(secrets.size).toBe(1);
    expect(ms.every((m) => m.net.keyState()!.keyEpoch === 1)).toBe(true);
  });

  it('a member whose hello crosses the rotation still gets in during the grace, not after it', async () => {
    const world = new MemoryNetwork();
    const meshId = createMeshId();
    const secret = createMeshSecret();
    let now = 1_000_000;
    const clock = () => now;
    const a = member(world, meshId, secret, { now: clock });
    const b = member(world, meshId, secret, { now: clock });
    await link(a, b);
    // b goes away without hearing the rotation (its connection drops first), then comes back with the old secret.
    await b.net.close(a.id, 'restarting');
    await disconnectedFrom(a, b.id);
    // b left before the rotation: not a member at that moment, so no grace for it.
    a.net.rotate();
    b.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await until(() => a.logs.find((l) => /missed the rotation/.test(l.msg)), 3_000, 'refused: not a member at rotation time');

    // c is admitted when a rotates again; its re-dial with the previous secret within the grace passes.
    const c = member(world, meshId, a.keys.at(-1)!.secret, { now: clock, key: { keyEpoch: 1, issuer: a.id, removed: [] } });
    await link(c, a);
    a.net.rotate();
    await until(() => (c.keys.length === 1 ? true : undefined), 3_000, 'c took the rekey');
    const c2 = member(world, meshId, a.keys.at(-2)!.secret, { now: clock });
    // c2 proves the previous secret but was not a member at rotation: refused.
    c2.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await until(() => (a.logs.filter((l) => /missed the rotation/.test(l.msg)).length >= 2 ? true : undefined), 3_000, 'c2 refused');
    // c itself reconnecting with the previous secret within the grace is admitted, and handed the rekey again.
    await c.net.close(a.id, 'reconnecting');
    await disconnectedFrom(a, c.id);
    const cOld = (c.net as unknown as { keys: { key: MeshKey } }).keys;
    cOld.key = { ...cOld.key, secret: a.keys.at(-2)!.secret, keyEpoch: 1 };
    c.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await connected(a, c.id);
    expect(a.logs.some((l) => /within its grace/.test(l.msg))).toBe(true);
    await until(() => (c.net.keyState()?.keyEpoch === 2 ? true : undefined), 3_000, 'c back on the current key');
    // After the grace the same hello is refused.
    await c.net.close(a.id, 'reconnecting');
    await disconnectedFrom(a, c.id);
    now += 60_000;
    cOld.key = { ...cOld.key, secret: a.keys.at(-2)!.secret, keyEpoch: 1 };
    c.net.execute({ type: 'net.dial', id: a.id, addrs: a.endpoint.addrs() });
    await until(() => (a.logs.filter((l) => /missed the rotation/.test(l.msg)).length >= 3 ? true : undefined), 3_000, 'refused after the grace');
  });

  it('the rekey message validates on the wire and bounds its removed list', () => {
    const meshId = createMeshId();
    const key = new Uint8Array(randomBytes(32));
    const r = makeRekey({ key: ed25519PrivateKey(key), issuer: endpointIdOf(key), meshId, current: { secret: createMeshSecret(), keyEpoch: 0, issuer: null, removed: [] }, remove: [], now: Date.now() });
    const parsed = parseMessage({ ...r, removed: [...r.removed] });
    expect(parsed.ok).toBe(true);
    expect(parseMessage({ ...r, removed: Array.from({ length: 300 }, () => endpointIdOf(new Uint8Array(randomBytes(32)))) }).ok).toBe(false);
    expect(parseMessage({ ...r, secret: new Uint8Array(16) }).ok).toBe(false);
    expect(verifyRekey(createMeshId(), r)).toBe(false); // bound to its mesh
  });

  it('a welcome carries the key epoch and removed members; a tampered welcome on the wire admits nothing', async () => {
    const world = new MemoryNetwork();
    const meshId = createMeshId();
    const secret = createMeshSecret();
    const inviter = member(world, meshId, secret);
    const other = member(world, meshId, secret);
    await link(inviter, other);
    inviter.net.rotate([other.id]);
    await disconnectedFrom(inviter, other.id);
    const newSecret = inviter.keys[0]!.secret;
    const token = () => decodeExpiringInvite(encodeExpiringInvite({ meshId, secret: newSecret, secretKey: inviter.signingKey, addrs: [], ttlMs: 60_000 }));

    // An honest welcome: the joiner learns epoch 1 and that `other` is removed.
    const welcomed: MeshKey[] = [];
    const joiner = member(world, meshId, null as unknown as Uint8Array, { secret: null, invites: [token()], onWelcome: ({ meshId: _, ...k }) => welcomed.push(k) });
    await link(joiner, inviter);
    expect(welcomed).toHaveLength(1);
    expect(welcomed[0]!.keyEpoch).toBe(1);
    expect(welcomed[0]!.removed).toEqual([other.id]);
    expect(joiner.net.keyState()).toMatchObject({ keyEpoch: 1, removed: [other.id] });

    // The same, with the welcome's secret changed in flight: the joiner refuses and learns nothing.
    const table = (inviter.net as unknown as { table: { write(s: unknown, m: { type: string; secret?: Uint8Array }): void } }).table;
    const write = table.write.bind(table);
    table.write = (sess, m) => write(sess, m.type === 'welcome' ? { ...m, secret: createMeshSecret() } : m);
    const fooled: MeshKey[] = [];
    const victim = member(world, meshId, null as unknown as Uint8Array, { secret: null, invites: [token()], onWelcome: ({ meshId: _, ...k }) => fooled.push(k) });
    victim.net.execute({ type: 'net.dial', id: inviter.id, addrs: inviter.endpoint.addrs() });
    await until(() => victim.logs.find((l) => /does not match the invite/.test(String(l.reason ?? l.msg))), 3_000, 'the tampered welcome refused');
    expect(fooled).toHaveLength(0);
    expect(victim.net.keyState()).toBeNull();
    expect(victim.net.peers()).toHaveLength(0);
  });
});
