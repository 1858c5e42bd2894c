// The hello with an expiring invite (issue 10, item 4): what the inviter decides (checkInviteHello), what
// travels (the invite's signed bytes and signature, the welcome), and what the wire validation accepts.
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { checkInviteHello, helloProof, makeHello } from '../src/io/wire/mesh-auth.ts';
import { createMeshId, createMeshSecret, decodeExpiringInvite, encodeExpiringInvite, endpointIdOf, expiringInviteFromParts, inviteKeyMatches } from '../src/io/wire/invite-token.ts';
import { encodeFrame, FrameDecoder } from '../src/io/wire/frame-codec.ts';
import type { MeshMessage } from '../src/machines/protocol.ts';
import { parseMessage } from '../src/io/wire/messages.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { chooseMesh } from '../src/io/host/mesh-memory.ts';
import { parseCliArgs } from '../src/io/host/cli-args.ts';

const facts = { role: 'client' as const, vramBytes: 0, model: null };
const inviterKey = new Uint8Array(randomBytes(32));
const INVITER = endpointIdOf(inviterKey);
const JOINER = asEndpointId('b2'.repeat(32));
const OTHER = asEndpointId('c3'.repeat(32));
const mesh = { meshId: createMeshId(), secret: createMeshSecret() };
const NOW = 1_800_000_000_000;
const mint = (over: Partial<Parameters<typeof encodeExpiringInvite>[0]> = {}) =>
  decodeExpiringInvite(encodeExpiringInvite({ ...mesh, secretKey: inviterKey, addrs: ['127.0.0.1:7000'], ttlMs: 60_000, now: NOW, ...over }));
const roundTrip = (m: MeshMessage): MeshMessage => {
  const r = new FrameDecoder().push(encodeFrame(m));
  if (r.error !== null || r.messages.length !== 1) throw new Error(`no round trip: ${String(r.error)}`);
  return r.messages[0]!;
};
const helloWith = (invite = mint(), key = invite.inviteKey, to = INVITER) => makeHello(facts, key, JOINER, to, undefined, invite) as ReturnType<typeof makeHello> & { invite: NonNullable<ReturnType<typeof makeHello>['invite']> };

describe('checkInviteHello', () => {
  it('admits a joiner proving the invite key of a valid invite, presented to its inviter', () => {
    const r = checkInviteHello(helloWith(), mesh, INVITER, JOINER, NOW);
    expect(r.ok).toBe(true);
  });

  it.each([
    ['INVITE_EXPIRED', () => checkInviteHello(helloWith(), mesh, INVITER, JOINER, NOW + 61_000)],
    ['INVITE_INVITER', () => checkInviteHello(helloWith(mint(), undefined, OTHER), mesh, OTHER, JOINER, NOW)],
    ['INVITE_KEY', () => checkInviteHello(helloWith(), { ...mesh, secret: createMeshSecret() }, INVITER, JOINER, NOW)],
    ['INVITE_MESH', () => checkInviteHello(helloWith(), { ...mesh, meshId: createMeshId() }, INVITER, JOINER, NOW)],
    ['INVITE_PROOF', () => checkInviteHello(helloWith(mint(), new Uint8Array(32).fill(1)), mesh, INVITER, JOINER, NOW)],
    // A hello made for another joiner, replayed from this connection: the proof binds both ids.
    ['HELLO_ID', () => checkInviteHello(helloWith(), mesh, INVITER, OTHER, NOW)],
    ['INVITE_SIGNATURE', () => {
      const h = helloWith();
      const sig = new Uint8Array(h.invite.signature);
      sig[3]! ^= 1;
      return checkInviteHello({ ...h, invite: { ...h.invite, signature: sig } }, mesh, INVITER, JOINER, NOW);
    }],
    ['INVITE_MALFORMED', () => {
      const h = helloWith();
      return checkInviteHello({ ...h, invite: { ...h.invite, signed: h.invite.signed.subarray(0, 50) } }, mesh, INVITER, JOINER, NOW);
    }],
  ])('refuses with %s', (code, run) => {
    const r = run();
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.code).toBe(code);
      expect(r.reason.length).toBeGreaterThan(10);
    }
  });

  it('the expired refusal says when and what to do', () => {
    const r = checkInviteHello(helloWith(), mesh, INVITER, JOINER, NOW + 120_000);
    expect(!r.ok && r.reason).toMatch(/the invite expired at .*ask a member for a new one \(mesh-inference invite\)/);
  });
});

describe('the invite and the welcome on the wire', () => {
  it('the hello carries the invite; the inviter parses it back to the same invite', () => {
    const invite = mint();
    const m = roundTrip(helloWith(invite));
    if (m.type !== 'hello' || m.invite === undefined) throw new Error('no hello with an invite');
    const back = expiringInviteFromParts(m.invite.signed, m.invite.signature);
    expect(back.inviter).toBe(INVITER);
    expect(back.expiresAt).toBe(invite.expiresAt);
    expect(Buffer.from(back.inviteKey).equals(Buffer.from(invite.inviteKey))).toBe(true);
    // A plain hello has no invite field at all.
    const plain = roundTrip(makeHello(facts, mesh.secret, JOINER, INVITER));
    expect(plain.type === 'hello' && 'invite' in plain).toBe(false);
  });

  it('a welcome round-trips; a welcome with a short secret or a bad mesh id is refused', () => {
    const w = roundTrip({ type: 'welcome', meshId: mesh.meshId, secret: mesh.secret });
    expect(w).toMatchObject({ type: 'welcome', meshId: mesh.meshId });
    expect(w.type === 'welcome' && Buffer.from(w.secret).equals(Buffer.from(mesh.secret))).toBe(true);
    expect(parseMessage({ type: 'welcome', meshId: mesh.meshId, secret: new Uint8Array(31) }).ok).toBe(false);
    expect(parseMessage({ type: 'welcome', meshId: 'XYZ', secret: mesh.secret }).ok).toBe(false);
    expect(parseMessage({ ...helloWith(), invite: { signed: new Uint8Array(2000), signature: new Uint8Array(64) } }).ok).toBe(false);
    expect(parseMessage({ ...helloWith(), invite: { signed: new Uint8Array(100), signature: new Uint8Array(63) } }).ok).toBe(false);
  });

  it('the joiner checks a welcome\'s secret against the invite key (and the inviter\'s hello proof with it)', () => {
    const invite = mint();
    expect(inviteKeyMatches(invite, mesh.secret)).toBe(true);
    expect(inviteKeyMatches(invite, createMeshSecret())).toBe(false);
    expect(helloProof(mesh.secret, INVITER, JOINER).length).toBe(32);
  });
});

describe('a node that joins with an mi2', () => {
  it('chooseMesh: no secret and the invite to present; with a remembered secret of that mesh (a restart), the secret', () => {
    const token = encodeExpiringInvite({ ...mesh, secretKey: inviterKey, addrs: ['127.0.0.1:7000'], ttlMs: 60_000 });
    const invite = decodeExpiringInvite(token);
    const fresh = chooseMesh([], null, false, JOINER, [invite]);
    expect(fresh).toMatchObject({ meshId: mesh.meshId, secret: null, how: 'joined', bootstrap: [{ id: INVITER, addrs: ['127.0.0.1:7000'] }] });
    expect(fresh.invites).toHaveLength(1);
    const again = chooseMesh([], { ...mesh, peers: [{ id: OTHER, addrs: ['127.0.0.1:7001'] }] }, false, JOINER, [invite]);
    expect(again.secret).toEqual(mesh.secret);
    expect(again.invites).toHaveLength(0);
    expect(again.bootstrap.map((p) => p.id)).toEqual([INVITER, OTHER]);
    const elsewhere = chooseMesh([], { meshId: createMeshId(), secret: createMeshSecret(), peers: [] }, false, JOINER, [invite]);
    expect(elsewhere).toMatchObject({ how: 'switched', secret: null });
    // --join mi2 parses into options.invites; a lite client may join with it; mixing meshes is refused.
    const r = parseCliArgs(['--client', '--join', token], {});
    expect(r.kind === 'run' && r.options.invites?.[0]?.inviter).toBe(INVITER);
    const other = encodeExpiringInvite({ meshId: createMeshId(), secret: createMeshSecret(), secretKey: inviterKey, addrs: [], ttlMs: 60_000 });
    expect(parseCliArgs(['--client', '--join', token, '--join', other], {})).toMatchObject({ kind: 'error', message: expect.stringMatching(/another mesh/) });
    expect(parseCliArgs(['invite', '--ttl', '90m'], {})).toEqual({ kind: 'invite', keyFile: null, ttlMs: 90 * 60_000 });
    expect(parseCliArgs(['invite', '--ttl', 'soon'], {})).toMatchObject({ kind: 'error' });
  });
});
