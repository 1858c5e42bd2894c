// Signed facts: each node signs its own announcement with its endpoint key (ed25519), and a fact about X counts
// only with X's valid signature, so no member can rewrite another node's facts or inflate its epoch. The
// endpoint id IS the public key (64 lowercase hex digits of its 32 bytes), so nothing else needs distributing.
//
// Signed bytes: UTF-8 of ANNOUNCEMENT_SIGNATURE_CONTEXT, 0x00, the 16-byte mesh id, then msgpack (msgpackr,
// records off) of the array (announcementContent, src/machines/gossip.ts)
//   [id, epoch, seq, name, role, vramBytes, model ? [name, bytes, fingerprint] : null, version, serving, addrs, connectedTo]
// followed, where the announcement carries its KV sizing (protocol 3), by [ctxSize, parallel, cacheType, flashAttn, layers, bytes].
// An array, not a map: no key order to agree on. Both sides encode the validated values, so a relayed
// announcement (fields and `sig` unchanged) verifies anywhere in the same mesh, and nowhere else.
import { createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { Packr } from 'msgpackr';
import { announcementContent } from '../../machines/gossip.ts';
import type { Announcement, AnnouncementAuthority, EndpointId } from '../../machines/mesh-types.ts';

/** Domain separation: these signatures can never be taken for another use of the endpoint key. */
export const ANNOUNCEMENT_SIGNATURE_CONTEXT = 'mesh-inference/announcement/v2';
export const SIGNATURE_BYTES = 64;

// The key file's 32 bytes are an ed25519 seed: wrapped in PKCS#8 (RFC 8410), node:crypto signs byte-identically
// to iroh's SecretKey.sign (test/announcement-signature.test.ts checks it against the binding).
const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');
const packr = new Packr({ useRecords: false });
const ZERO = Buffer.from([0]);

/** The bytes an announcement's signature covers (see the file header). */
export function announcementSigningBytes(meshId: string, a: Announcement): Uint8Array {
  const fields = announcementContent(a);
  return Buffer.concat([Buffer.from(ANNOUNCEMENT_SIGNATURE_CONTEXT, 'utf8'), ZERO, meshIdBytes(meshId), packr.pack(fields)]);
}

/** The node:crypto key of a 32-byte endpoint secret key (the key file's content). */
export function ed25519PrivateKey(secretKey: Uint8Array): KeyObject {
  if (secretKey.length !== 32) throw new TypeError(`an endpoint secret key has 32 bytes, got ${secretKey.length}`);
  return createPrivateKey({ key: Buffer.concat([PKCS8_ED25519_PREFIX, secretKey]), format: 'der', type: 'pkcs8' });
}

/** The endpoint id (hex of the ed25519 public key) of a 32-byte secret key. */
export function endpointIdOf(secretKey: Uint8Array): EndpointId {
  const spki = createPublicKey(ed25519PrivateKey(secretKey)).export({ format: 'der', type: 'spki' });
  return spki.subarray(SPKI_ED25519_PREFIX.length).toString('hex') as EndpointId;
}

/** The announcement with its owner's signature (the key must be the one of `a.id`). */
export function signAnnouncement(key: KeyObject, meshId: string, a: Announcement): Announcement {
  const { sig: _, ...unsigned } = a;
  const sig = new Uint8Array(sign(null, announcementSigningBytes(meshId, unsigned), key));
  return { ...unsigned, sig };
}

// Public keys parsed once per id; bounded (a flood of fake ids must not grow it without end).
const publicKeys = new Map<string, KeyObject>();
const MAX_CACHED_KEYS = 1024;

/** The ed25519 public key an endpoint id names; null when the id is not one (not hex, not a curve point). */
export function publicKeyOf(id: EndpointId): KeyObject | null {
  let key = publicKeys.get(id);
  if (key !== undefined) return key;
  if (!/^[0-9a-f]{64}$/.test(id)) return null;
  try {
    key = createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, Buffer.from(id, 'hex')]), format: 'der', type: 'spki' });
  } catch {
    return null; // not a point on the curve
  }
  if (publicKeys.size >= MAX_CACHED_KEYS) publicKeys.clear();
  publicKeys.set(id, key);
  return key;
}

/** Whether `a` carries a valid signature by the key its own id names, for this mesh. Never throws. */
export function verifyAnnouncement(meshId: string, a: Announcement): boolean {
  const sig = a.sig;
  if (!(sig instanceof Uint8Array) || sig.length !== SIGNATURE_BYTES) return false;
  const key = publicKeyOf(a.id);
  if (key === null) return false;
  try {
    return verify(null, announcementSigningBytes(meshId, a), key, sig);
  } catch {
    return false;
  }
}

/**
 * What the node machine needs (NodeInput.facts): signs with this node's endpoint key, verifies anyone's, both
 * bound to this mesh. `secretKey` is the endpoint's 32-byte key, `meshId` the mesh id in hex.
 */
export function announcementAuthority(secretKey: Uint8Array, meshId: string): AnnouncementAuthority {
  const key = ed25519PrivateKey(secretKey);
  meshIdBytes(meshId); // fail now on a bad mesh id, not at the first signature
  return {
    sign: (a) => signAnnouncement(key, meshId, a),
    verify: (a) => verifyAnnouncement(meshId, a),
  };
}

export function meshIdBytes(meshId: string): Buffer {
  if (!/^[0-9a-f]{32}$/.test(meshId)) throw new TypeError(`a mesh id is 32 lowercase hex digits, got ${JSON.stringify(meshId.slice(0, 40))}`);
  return Buffer.from(meshId, 'hex');
}
