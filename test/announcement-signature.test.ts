// Signed facts (issue 10, item 3): the key file's key signs through node:crypto exactly as iroh's SecretKey does,
// the endpoint id is the hex of the public key, a relayed announcement still verifies, and anything else does not.
import { randomBytes, sign } from 'node:crypto';
import { EndpointId as IrohEndpointId, SecretKey, Signature } from '@number0/iroh';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  ANNOUNCEMENT_SIGNATURE_CONTEXT,
  announcementAuthority,
  announcementSigningBytes,
  ed25519PrivateKey,
  endpointIdOf,
  signAnnouncement,
  verifyAnnouncement,
} from '../src/io/wire/announcement-signature.ts';
import { encodeFrame, FrameDecoder } from '../src/io/wire/frame-codec.ts';
import { createMeshId } from '../src/io/wire/invite-token.ts';
import { PROTOCOL_VERSION, type Announcement } from '../src/machines/mesh-types.ts';

const key = (): Uint8Array => new Uint8Array(randomBytes(32));

function announcementOf(secret: Uint8Array, extra: Partial<Announcement> = {}): Announcement {
  const id = endpointIdOf(secret);
  return {
    id,
    epoch: 1_700_000_000_000,
    seq: 3,
    name: 'node',
    role: 'auto',
    vramBytes: 12e9,
    model: { name: 'm.gguf', bytes: 10e9, fingerprint: 'fp' },
    version: PROTOCOL_VERSION,
    serving: true,
    addrs: ['127.0.0.1:4000', '[::1]:4000'],
    connectedTo: [endpointIdOf(key())].sort(),
    ...extra,
  };
}

describe('the endpoint key signs announcements', () => {
  it("node:crypto with the key file's 32 bytes signs byte-identically to iroh's SecretKey.sign, and the id is the public key in hex", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.uint8Array({ maxLength: 300 }), (secret, message) => {
        const iroh = SecretKey.fromBytes([...secret]);
        const ours = new Uint8Array(sign(null, message, ed25519PrivateKey(secret)));
        expect(Buffer.from(ours).toString('hex')).toBe(Buffer.from(iroh.sign([...message]).toBytes()).toString('hex'));
        const id = endpointIdOf(secret);
        expect(id).toMatch(/^[0-9a-f]{64}$/);
        expect(id).toBe(iroh.public().toString());
        expect(Buffer.from(iroh.public().toBytes()).toString('hex')).toBe(id);
        // And iroh verifies our signature against the id it parses from that string.
        const sig = signAnnouncement(ed25519PrivateKey(secret), createMeshId(), announcementOf(secret)).sig!;
        expect(sig).toHaveLength(64);
        expect(IrohEndpointId.fromString(id).toString()).toBe(id);
      }),
      { numRuns: 20 },
    );
  });

  it('the signature covers a context string, the mesh id and the fields', () => {
    const secret = key();
    const meshId = createMeshId();
    const a = announcementOf(secret);
    const bytes = Buffer.from(announcementSigningBytes(meshId, a));
    expect(bytes.subarray(0, ANNOUNCEMENT_SIGNATURE_CONTEXT.length).toString('utf8')).toBe('mesh-inference/announcement/v2');
    expect(bytes[ANNOUNCEMENT_SIGNATURE_CONTEXT.length]).toBe(0);
    expect(bytes.subarray(ANNOUNCEMENT_SIGNATURE_CONTEXT.length + 1, ANNOUNCEMENT_SIGNATURE_CONTEXT.length + 17).toString('hex')).toBe(meshId);
    // iroh's verifier accepts what node:crypto signed over those bytes.
    const signed = announcementAuthority(secret, meshId).sign(a);
    expect(() => IrohEndpointId.fromString(signed.id).verify([...bytes], Signature.fromBytes([...signed.sig!]))).not.toThrow();
  });

  it('an announcement relayed verbatim through the wire codec still verifies', () => {
    const secret = key();
    const meshId = createMeshId();
    const authority = announcementAuthority(secret, meshId);
    const signed = authority.sign(announcementOf(secret));
    // Relayed by two other nodes: decoded, validated, re-encoded, decoded again.
    let a = signed;
    for (let hop = 0; hop < 2; hop++) {
      const { messages, error } = new FrameDecoder().push(encodeFrame({ type: 'gossip', announcements: [a] }));
      expect(error).toBeNull();
      const m = messages[0]!;
      if (m.type !== 'gossip') throw new Error('not gossip');
      a = m.announcements[0]!;
    }
    expect(a).toEqual(signed);
    expect(verifyAnnouncement(meshId, a)).toBe(true);
    expect(announcementAuthority(key(), meshId).verify(a)).toBe(true); // anyone in the mesh can check it
  });

  it('rejects a tampered field, a signature by another key, another mesh, and no signature', () => {
    const victim = key();
    const forger = key();
    const meshId = createMeshId();
    const signed = announcementAuthority(victim, meshId).sign(announcementOf(victim));
    const tampered: Partial<Announcement>[] = [
      { epoch: Number.MAX_SAFE_INTEGER },
      { seq: signed.seq + 1 },
      { name: 'evil' },
      { role: 'client' },
      { vramBytes: 0 },
      { model: null },
      { model: { ...signed.model!, fingerprint: 'other' } },
      { version: PROTOCOL_VERSION + 1 },
      // Protocol 3: the KV sizing is signed too (an added or altered one makes the election size plans differently).
      { kv: { ctxSize: 4096, parallel: 1, cacheType: 'f16', flashAttn: 'off', layers: 8, bytes: 0 } },
      { serving: false },
      { addrs: ['10.0.0.1:1'] },
      { connectedTo: [] },
    ];
    for (const change of tampered) expect(verifyAnnouncement(meshId, { ...signed, ...change }), JSON.stringify(change)).toBe(false);
    // The forger signs a fact about the victim with its own key: valid signature, wrong key.
    const forged = signAnnouncement(ed25519PrivateKey(forger), meshId, { ...signed, role: 'client', epoch: Number.MAX_SAFE_INTEGER });
    expect(verifyAnnouncement(meshId, forged)).toBe(false);
    expect(verifyAnnouncement(createMeshId(), signed)).toBe(false);
    const { sig: _, ...unsigned } = signed;
    expect(verifyAnnouncement(meshId, unsigned)).toBe(false);
    expect(verifyAnnouncement(meshId, { ...signed, sig: new Uint8Array(64) })).toBe(false);
    expect(verifyAnnouncement(meshId, { ...signed, id: 'ff'.repeat(32) as never })).toBe(false); // likely not a curve point
  });

  it('any single flipped bit of the signature is rejected', () => {
    const secret = key();
    const meshId = createMeshId();
    const signed = announcementAuthority(secret, meshId).sign(announcementOf(secret));
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 64 * 8 - 1 }), (bit) => {
        const sig = new Uint8Array(signed.sig!);
        sig[bit >> 3] = sig[bit >> 3]! ^ (1 << (bit & 7));
        expect(verifyAnnouncement(meshId, { ...signed, sig })).toBe(false);
      }),
      { numRuns: 100 },
    );
  });
});

