// Expiring invites (issue 10, item 4; src/io/wire/invite-token.ts, "mi2"): no mesh secret inside, signed by
// the inviter's endpoint key (node:crypto's ed25519 on the key file's 32 bytes gives the id the iroh binding
// gives), and refused by the admitting node's check once expired, tampered, foreign or minted with another secret.
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import {
  checkExpiringInvite,
  createMeshId,
  createMeshSecret,
  decodeExpiringInvite,
  encodeExpiringInvite,
  endpointIdOf,
  InviteTokenError,
} from '../src/io/wire/invite-token.ts';

const key = () => new Uint8Array(randomBytes(32));
const mesh = { meshId: createMeshId(), secret: createMeshSecret() };

describe('expiring invites', () => {
  it('the endpoint id node:crypto derives from a key file\'s key is the one iroh uses', async () => {
    const k = key();
    const ep = await createIrohEndpoint({ secretKey: k, bindHost: '127.0.0.1', relay: 'none' });
    try {
      expect(endpointIdOf(k)).toBe(ep.id);
    } finally {
      await ep.close();
    }
  });

  it('round-trips, carries no mesh secret, and passes the check while valid', () => {
    const k = key();
    const now = Date.now();
    const text = encodeExpiringInvite({ ...mesh, secretKey: k, addrs: ['127.0.0.1:4000', '[::1]:4000'], ttlMs: 24 * 3600_000, now });
    expect(text.startsWith('mi2')).toBe(true);
    expect(Buffer.from(text.slice(3), 'base64url').includes(Buffer.from(mesh.secret))).toBe(false);
    const inv = decodeExpiringInvite(text);
    expect(inv).toMatchObject({ meshId: mesh.meshId, inviter: endpointIdOf(k), addrs: ['127.0.0.1:4000', '[::1]:4000'] });
    expect(inv.expiresAt).toBeGreaterThanOrEqual(now + 24 * 3600_000);
    expect(checkExpiringInvite(inv, mesh, now)).toEqual({ ok: true });
  });

  it('a 1 s invite is refused once expired', async () => {
    const inv = decodeExpiringInvite(encodeExpiringInvite({ ...mesh, secretKey: key(), addrs: ['127.0.0.1:4000'], ttlMs: 1_000 }));
    expect(checkExpiringInvite(inv, mesh, Date.now()).ok).toBe(true);
    await new Promise((r) => setTimeout(r, inv.expiresAt - Date.now() + 10));
    const c = checkExpiringInvite(inv, mesh, Date.now());
    expect(c).toMatchObject({ ok: false, code: 'INVITE_EXPIRED' });
    expect(!c.ok && c.reason).toMatch(/expired at .*mesh-inference invite/);
  });

  it('a longer expiry written in (with a fixed checksum) breaks the signature', () => {
    const inv = decodeExpiringInvite(encodeExpiringInvite({ ...mesh, secretKey: key(), addrs: [], ttlMs: 1_000 }));
    const forged = { ...inv, expiresAt: inv.expiresAt + 365 * 24 * 3600_000, signed: Uint8Array.from(inv.signed) };
    Buffer.from(forged.signed.buffer).writeUInt32BE(forged.expiresAt / 1000, 49);
    expect(checkExpiringInvite(forged, mesh, Date.now() + 10_000)).toMatchObject({ ok: false, code: 'INVITE_SIGNATURE' });
  });

  it('another mesh, another secret (a rotation), another signer: refused', () => {
    const inv = decodeExpiringInvite(encodeExpiringInvite({ ...mesh, secretKey: key(), addrs: [], ttlMs: 60_000 }));
    const now = Date.now();
    expect(checkExpiringInvite(inv, { meshId: createMeshId(), secret: mesh.secret }, now)).toMatchObject({ ok: false, code: 'INVITE_MESH' });
    expect(checkExpiringInvite(inv, { meshId: mesh.meshId, secret: createMeshSecret() }, now)).toMatchObject({ ok: false, code: 'INVITE_KEY' });
    expect(checkExpiringInvite({ ...inv, inviter: endpointIdOf(key()) }, mesh, now)).toMatchObject({ ok: false, code: 'INVITE_SIGNATURE' });
  });

  it('a damaged token is an InviteTokenError', () => {
    const text = encodeExpiringInvite({ ...mesh, secretKey: key(), addrs: ['127.0.0.1:1'], ttlMs: 60_000 });
    const i = 20;
    const damaged = text.slice(0, i) + (text[i] === 'A' ? 'B' : 'A') + text.slice(i + 1);
    expect(() => decodeExpiringInvite(damaged)).toThrow(InviteTokenError);
    expect(() => decodeExpiringInvite(text.slice(0, 40))).toThrow(InviteTokenError);
  });
});
