// Proof that an admin request to a node's API (`POST /api/mesh/rotate`) comes from someone who can read that
// node's key file: an ed25519 signature by the node's own endpoint key over the method, the path, a timestamp
// and the body's hash. The API's bearer key (`--api-key`) lets clients use the model; only the key file's
// holder (the node's owner: the file is 0600) changes the mesh. Sent as `x-mesh-admin: <ms>.<base64url sig>`.
import { createHash, sign, verify, type KeyObject } from 'node:crypto';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { publicKeyOf } from './announcement-signature.ts';

export const ADMIN_PROOF_HEADER = 'x-mesh-admin';
/** The owner's rotate / remove route, and what it answers (the node serves it, `mesh-inference rotate` asks it). */
export const ROTATE_PATH = '/api/mesh/rotate';

export interface RotationAnswer {
  readonly meshId: string;
  readonly keyEpoch: number;
  readonly told: ReadonlyArray<{ readonly id: EndpointId; readonly name: string }>;
  readonly removed: ReadonlyArray<{ readonly id: EndpointId; readonly name: string }>;
  /** The mesh file holding the new secret (make new invites from it), or null for an ephemeral key. */
  readonly meshFile: string | null;
}
export const ADMIN_PROOF_CONTEXT = 'mesh-inference/admin/v1';
/** How far the request's timestamp may be from the node's clock (both ends are the same machine). */
export const ADMIN_PROOF_SKEW_MS = 60_000;

function signedBytes(method: string, path: string, at: number, body: Uint8Array): Buffer {
  const bodyHash = createHash('sha256').update(body).digest('hex');
  return Buffer.from(`${ADMIN_PROOF_CONTEXT}\n${method.toUpperCase()} ${path}\n${at}\n${bodyHash}`, 'utf8');
}

/** The header value for a request (the node's key, as the key file holds it). */
export function adminProof(key: KeyObject, method: string, path: string, body: Uint8Array, now = Date.now()): string {
  const at = Math.floor(now);
  return `${at}.${sign(null, signedBytes(method, path, at, body), key).toString('base64url')}`;
}

/** Why a header does not prove the key of `owner`, or null when it does. Never throws. */
export function checkAdminProof(owner: EndpointId, header: string | undefined, method: string, path: string, body: Uint8Array, now = Date.now()): string | null {
  if (header === undefined || header === '') return `missing ${ADMIN_PROOF_HEADER}: admin routes are signed with the node's key file (use the mesh-inference CLI on the node's machine)`;
  const m = /^(\d{1,16})\.([A-Za-z0-9_-]{80,100})$/.exec(header.trim());
  if (m === null) return `malformed ${ADMIN_PROOF_HEADER}`;
  const at = Number(m[1]);
  if (Math.abs(now - at) > ADMIN_PROOF_SKEW_MS) return `${ADMIN_PROOF_HEADER} is stale or from the future (${Math.round((now - at) / 1000)} s off)`;
  const key = publicKeyOf(owner);
  if (key === null) return 'this node has no verifiable key';
  try {
    if (verify(null, signedBytes(method, path, at, body), key, Buffer.from(m[2]!, 'base64url'))) return null;
  } catch {
    // a malformed signature: fall through
  }
  return `${ADMIN_PROOF_HEADER} is not signed by this node's key (another key file?)`;
}
