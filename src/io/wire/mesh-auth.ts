// Admission: the hello proves that its sender holds the mesh secret without sending it, and carries the
// protocol version. QUIC/TLS already authenticates both endpoint ids, so binding both ids into the proof
// makes a hello useless to replay towards anyone else.
import { createHmac, timingSafeEqual } from 'node:crypto';
import { PROTOCOL_VERSION, type EndpointId, type ModelIdentity, type RolePreference } from '../../machines/mesh-types.ts';
import type { HelloInvite, HelloMessage } from '../../machines/protocol.ts';
import { checkExpiringInvite, expiringInviteFromParts, InviteTokenError, type ExpiringInvite } from './invite-token.ts';

/** Domain separation: a proof for this protocol can never be mistaken for another HMAC of the same secret. */
export const HELLO_PROOF_CONTEXT = 'mesh-inference/1 hello';
export const HELLO_PROOF_BYTES = 32;

/** HMAC-SHA256(secret, context 0x00 sender 0x00 receiver): ids are hex, the zero bytes keep fields apart. */
export function helloProof(secret: Uint8Array, sender: EndpointId, receiver: EndpointId): Uint8Array {
  const mac = createHmac('sha256', secret);
  mac.update(HELLO_PROOF_CONTEXT, 'utf8');
  mac.update(ZERO);
  mac.update(sender, 'utf8');
  mac.update(ZERO);
  mac.update(receiver, 'utf8');
  return new Uint8Array(mac.digest());
}
const ZERO = new Uint8Array([0]);

/** Constant time in the proof's content (the length is public: it is fixed by the protocol). */
export function verifyHelloProof(secret: Uint8Array, sender: EndpointId, receiver: EndpointId, proof: Uint8Array): boolean {
  if (!(proof instanceof Uint8Array) || proof.length !== HELLO_PROOF_BYTES) return false;
  return timingSafeEqual(helloProof(secret, sender, receiver), proof);
}

/** The local facts a hello carries besides the proof (the network layer fills in ids and proof). */
export interface HelloFacts {
  readonly role: RolePreference;
  readonly vramBytes: number;
  readonly model: ModelIdentity | null;
}

/**
 * Our hello to `remote`. `key` is the mesh secret, or (for a joiner that holds only an expiring invite) the
 * invite's invite key, with the invite itself in `invite`.
 */
export function makeHello(facts: HelloFacts, key: Uint8Array, self: EndpointId, remote: EndpointId, version = PROTOCOL_VERSION, invite?: HelloInvite): HelloMessage {
  return {
    type: 'hello',
    version,
    id: self,
    role: facts.role,
    vramBytes: facts.vramBytes,
    model: facts.model,
    proof: helloProof(key, self, remote),
    ...(invite === undefined ? {} : { invite: { signed: invite.signed, signature: invite.signature } }),
  };
}

export type HelloRefusalCode =
  | 'HELLO_VERSION'
  | 'HELLO_ID'
  | 'HELLO_PROOF'
  | 'REMOVED'
  | 'INVITE_MALFORMED'
  | 'INVITE_INVITER'
  | 'INVITE_EXPIRED'
  | 'INVITE_MESH'
  | 'INVITE_SIGNATURE'
  | 'INVITE_KEY'
  | 'INVITE_PROOF';

export type HelloCheck = { readonly ok: true } | { readonly ok: false; readonly code: HelloRefusalCode; readonly reason: string };

/**
 * Decides whether to admit a peer from its hello. `remote` is the id the QUIC handshake authenticated,
 * `self` ours, `version` the protocol version we speak. The reason is written for the people reading either side's log (it travels in `leaving`).
 */
export function checkHello(
  hello: HelloMessage,
  secret: Uint8Array,
  self: EndpointId,
  remote: EndpointId,
  version: number = PROTOCOL_VERSION,
): HelloCheck {
  const basic = checkVersionAndId(hello, self, remote, version);
  if (!basic.ok) return basic;
  if (!verifyHelloProof(secret, remote, self, hello.proof)) {
    return {
      ok: false,
      code: 'HELLO_PROOF',
      reason: `wrong mesh secret: the hello of ${short(remote)} does not prove the secret that ${short(self)} holds (invite token of another mesh?)`,
    };
  }
  return { ok: true };
}

/**
 * Decides whether to admit a joiner by the expiring invite its hello presents: version and id as
 * `checkHello`; then the invite must name this node as its inviter (the joiner trusts no one else to hand it
 * the secret), pass `checkExpiringInvite` (mesh, expiry, the inviter's signature, an invite key minted with
 * the secret this node holds), and the hello's proof must be keyed by that invite key.
 */
export function checkInviteHello(
  hello: HelloMessage & { readonly invite: HelloInvite },
  mesh: { readonly meshId: string; readonly secret: Uint8Array },
  self: EndpointId,
  remote: EndpointId,
  now: number,
  version: number = PROTOCOL_VERSION,
): { readonly ok: true; readonly invite: ExpiringInvite } | (HelloCheck & { readonly ok: false }) {
  const basic = checkVersionAndId(hello, self, remote, version);
  if (!basic.ok) return basic;
  let invite: ExpiringInvite;
  try {
    invite = expiringInviteFromParts(hello.invite.signed, hello.invite.signature);
  } catch (err) {
    return { ok: false, code: 'INVITE_MALFORMED', reason: `the invite in the hello of ${short(remote)} is malformed: ${err instanceof InviteTokenError ? err.message : String(err)}` };
  }
  if (invite.inviter !== self) {
    return { ok: false, code: 'INVITE_INVITER', reason: `the invite was made by ${short(invite.inviter)}, not by ${short(self)}: only its inviter admits with it` };
  }
  const check = checkExpiringInvite(invite, mesh, now);
  if (!check.ok) return { ok: false, code: check.code, reason: check.reason };
  if (!verifyHelloProof(invite.inviteKey, remote, self, hello.proof)) {
    return { ok: false, code: 'INVITE_PROOF', reason: `the hello of ${short(remote)} does not prove the invite key of the invite it presents` };
  }
  return { ok: true, invite };
}

/** The part of `checkHello` that needs no secret: the version, and that the hello names the authenticated id. */
export function checkVersionAndId(hello: HelloMessage, self: EndpointId, remote: EndpointId, version: number): HelloCheck {
  // One version at a time for now; a range goes here once there is a second version to stay compatible with.
  // The reason travels to the peer in `leaving` (so both logs hold it): both versions, and whom to upgrade.
  if (hello.version !== version) {
    const upgrade =
      hello.version < version ? `upgrade peer ${short(remote)} (the older one)` : `upgrade node ${short(self)} (the older one)`;
    return {
      ok: false,
      code: 'HELLO_VERSION',
      reason: `incompatible protocol version: peer ${short(remote)} speaks ${hello.version}, node ${short(self)} speaks ${version}: ${upgrade}`,
    };
  }
  if (hello.id !== remote) {
    return { ok: false, code: 'HELLO_ID', reason: `hello claims id ${short(hello.id)} but the connection is from ${short(remote)}` };
  }
  return { ok: true };
}

const short = (id: string): string => (typeof id === 'string' ? id.slice(0, 10) : String(id));
