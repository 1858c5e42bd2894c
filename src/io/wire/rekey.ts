// Rotating the mesh secret (and removing members): the signed `rekey` message. One member makes it with a
// fresh random secret and the next key epoch, signs it with its endpoint key, and sends it on the admitted,
// QUIC-encrypted control streams of every member but the removed ones; members relay it verbatim. The
// signature makes the issuer accountable (the log names it) and keeps a relay from changing a field.
//
// Signed bytes: UTF-8 of REKEY_SIGNATURE_CONTEXT, 0x00, the 16-byte mesh id, then msgpack (records off) of
//   [keyEpoch, secret, removed, issuer, issuedAt]
// Order: a rekey is newer than another when its key epoch is higher, or equal with the higher issuer id (two
// members rotating at once end on the same secret everywhere).
import { createHash, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { Packr } from 'msgpackr';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { RekeyMessage } from '../../machines/protocol.ts';
import { meshIdBytes, publicKeyOf, SIGNATURE_BYTES } from './announcement-signature.ts';
import { MESH_SECRET_BYTES } from './invite-token.ts';

export const REKEY_SIGNATURE_CONTEXT = 'mesh-inference/rekey/v1';
/** Members a mesh remembers as removed; the oldest go first past it. */
export const MAX_REMOVED = 256;

const packr = new Packr({ useRecords: false });

/** Where a member's secret stands: the secret, its rotation count and who made it, and who is removed. */
export interface MeshKey {
  readonly secret: Uint8Array;
  readonly keyEpoch: number;
  /** The rekey's issuer; null for the founder's secret (epoch 0) or one learned without a rekey. */
  readonly issuer: EndpointId | null;
  readonly removed: readonly EndpointId[];
}

function signingBytes(r: Omit<RekeyMessage, 'type' | 'sig'>): Uint8Array {
  const fields = [r.keyEpoch, r.secret, [...r.removed], r.issuer, r.issuedAt];
  return Buffer.concat([Buffer.from(REKEY_SIGNATURE_CONTEXT, 'utf8'), Buffer.from([0]), meshIdBytes(r.meshId), packr.pack(fields)]);
}

/**
 * A rekey after `current`: a fresh secret, the next epoch, the removed members so far plus `remove` (never the
 * issuer itself), signed with the issuer's endpoint key.
 */
export function makeRekey(init: {
  readonly key: KeyObject;
  readonly issuer: EndpointId;
  readonly meshId: string;
  readonly current: MeshKey;
  readonly remove: readonly EndpointId[];
  readonly now: number;
}): RekeyMessage {
  const removed = [...new Set([...init.current.removed, ...init.remove])].filter((id) => id !== init.issuer).slice(-MAX_REMOVED);
  const unsigned = {
    meshId: init.meshId,
    keyEpoch: init.current.keyEpoch + 1,
    secret: new Uint8Array(randomBytes(MESH_SECRET_BYTES)),
    removed,
    issuer: init.issuer,
    issuedAt: Math.floor(init.now),
  };
  return { type: 'rekey', ...unsigned, sig: new Uint8Array(sign(null, signingBytes(unsigned), init.key)) };
}

/** Whether `r` is for this mesh and carries its issuer's valid signature. Never throws. */
export function verifyRekey(meshId: string, r: RekeyMessage): boolean {
  if (r.meshId !== meshId || r.sig.length !== SIGNATURE_BYTES || r.secret.length !== MESH_SECRET_BYTES) return false;
  const key = publicKeyOf(r.issuer);
  if (key === null) return false;
  try {
    return verify(null, signingBytes(r), key, r.sig);
  } catch {
    return false;
  }
}

/** Whether a rekey at (keyEpoch, issuer) replaces the key a member holds. */
export function isNewerKey(r: Pick<RekeyMessage, 'keyEpoch' | 'issuer'>, held: MeshKey): boolean {
  if (r.keyEpoch !== held.keyEpoch) return r.keyEpoch > held.keyEpoch;
  return held.issuer !== null && r.issuer > held.issuer;
}

/** A short, non-secret name of a secret for logs and status: which one a node holds, without revealing it. */
export function secretFingerprint(secret: Uint8Array): string {
  return createHash('sha256').update('mesh-inference/secret-fingerprint').update(secret).digest('hex').slice(0, 8);
}
