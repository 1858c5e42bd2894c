// The invite token: one copy-pasteable string that carries everything a new node needs to join a mesh
// (mesh id and secret, and where to reach the inviter). Decoding never throws anything but InviteTokenError.
import { createHmac, createPrivateKey, createPublicKey, randomBytes, sign as cryptoSign, timingSafeEqual, verify as cryptoVerify } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { asEndpointId, type EndpointId } from '../../machines/mesh-types.ts';

/*
 * Wire form: "mi" + <version digit> + base64url(no padding) of
 *
 *   off  size  field
 *   0    1     version (equals the digit in the prefix)
 *   1    16    mesh id
 *   17   32    mesh secret
 *   49   32    inviter endpoint id (ed25519 public key; its string form is lowercase hex)
 *   81   1     address count n (<= MAX_ADDRS)
 *   82   ...   n x (u8 length, UTF-8 "ip:port" or "[ipv6]:port")
 *   end  4     CRC-32 (big endian) of every byte before it
 *
 * CRC-32 catches every burst error up to 32 bits, so any single changed character (which touches at most
 * two adjacent bytes) is always caught; the base64url text must also be canonical, so that changing the
 * unused low bits of the last character cannot slip through either.
 */

export const INVITE_TOKEN_VERSION = 1;
const PREFIX = 'mi';
const MESH_ID_BYTES = 16;
export const MESH_SECRET_BYTES = 32;
const ENDPOINT_ID_BYTES = 32;
const MAX_ADDRS = 16;
const MAX_ADDR_BYTES = 64;
const HEADER_BYTES = 1 + MESH_ID_BYTES + MESH_SECRET_BYTES + ENDPOINT_ID_BYTES + 1;
const CRC_BYTES = 4;

export interface InviteToken {
  readonly version: number;
  /** 16 random bytes as 32 lowercase hex characters; names the mesh in logs and status. */
  readonly meshId: string;
  /** 32 random bytes; never logged, never sent: the hello proves it with an HMAC. */
  readonly secret: Uint8Array;
  readonly inviter: EndpointId;
  /** "ip:port" / "[ipv6]:port": the inviter's LAN addresses, then its STUN public address if known. */
  readonly addrs: readonly string[];
}

export type InviteTokenErrorCode =
  | 'TOKEN_EMPTY'
  | 'TOKEN_FOREIGN'
  | 'TOKEN_VERSION'
  | 'TOKEN_ENCODING'
  | 'TOKEN_TRUNCATED'
  | 'TOKEN_CORRUPT'
  | 'TOKEN_INVALID';

/** One-line, user-facing: the CLI prints `message` and exits; `code` is for tests and tools. */
export class InviteTokenError extends Error {
  override readonly name = 'InviteTokenError';
  constructor(
    readonly code: InviteTokenErrorCode,
    message: string,
  ) {
    super(message);
  }
}

export const createMeshSecret = (): Uint8Array => new Uint8Array(randomBytes(MESH_SECRET_BYTES));
export const createMeshId = (): string => randomBytes(MESH_ID_BYTES).toString('hex');

/**
 * The addresses to put in a token: the LAN addresses, then the STUN public address (only known when
 * `--bind-port` fixes the port), without duplicates and without ones a token cannot carry.
 */
export function inviteAddrs(lanAddrs: readonly string[], publicAddr?: string | null): string[] {
  const out: string[] = [];
  for (const a of [...lanAddrs, ...(publicAddr ? [publicAddr] : [])]) {
    if (parseSocketAddr(a) && !out.includes(a) && Buffer.byteLength(a) <= MAX_ADDR_BYTES) out.push(a);
  }
  return out.slice(0, MAX_ADDRS);
}

export function encodeInviteToken(invite: Omit<InviteToken, 'version'> & { version?: number }): string {
  const version = invite.version ?? INVITE_TOKEN_VERSION;
  if (version !== INVITE_TOKEN_VERSION) throw new InviteTokenError('TOKEN_VERSION', `cannot write invite token version ${version}`);
  if (!/^[0-9a-f]{32}$/.test(invite.meshId)) throw new InviteTokenError('TOKEN_INVALID', 'mesh id must be 32 lowercase hex characters');
  if (invite.secret.length !== MESH_SECRET_BYTES) throw new InviteTokenError('TOKEN_INVALID', `mesh secret must be ${MESH_SECRET_BYTES} bytes`);
  if (!/^[0-9a-f]{64}$/.test(invite.inviter)) throw new InviteTokenError('TOKEN_INVALID', 'inviter endpoint id must be 64 lowercase hex characters');
  if (invite.addrs.length > MAX_ADDRS) throw new InviteTokenError('TOKEN_INVALID', `at most ${MAX_ADDRS} addresses fit in a token`);
  const addrBytes = invite.addrs.map((a) => {
    const b = Buffer.from(a, 'utf8');
    if (!parseSocketAddr(a) || b.length > MAX_ADDR_BYTES) throw new InviteTokenError('TOKEN_INVALID', `not an ip:port address: ${JSON.stringify(a)}`);
    return b;
  });
  const bodyLen = HEADER_BYTES + addrBytes.reduce((n, b) => n + 1 + b.length, 0);
  const buf = Buffer.alloc(bodyLen + CRC_BYTES);
  let o = 0;
  buf[o++] = version;
  o += Buffer.from(invite.meshId, 'hex').copy(buf, o);
  o += Buffer.from(invite.secret).copy(buf, o);
  o += Buffer.from(invite.inviter, 'hex').copy(buf, o);
  buf[o++] = addrBytes.length;
  for (const b of addrBytes) {
    buf[o++] = b.length;
    o += b.copy(buf, o);
  }
  buf.writeUInt32BE(crc32(buf.subarray(0, bodyLen)), bodyLen);
  return `${PREFIX}${version}${buf.toString('base64url')}`;
}

export function decodeInviteToken(text: string): InviteToken {
  if (typeof text !== 'string') throw new InviteTokenError('TOKEN_EMPTY', 'invite token must be a string');
  const token = text.trim();
  if (token.length === 0) throw new InviteTokenError('TOKEN_EMPTY', 'invite token is empty');
  const head = /^mi([0-9])/.exec(token);
  if (!head) throw new InviteTokenError('TOKEN_FOREIGN', 'not a mesh-inference invite token (it should start with "mi1")');
  const version = Number(head[1]);
  if (version !== INVITE_TOKEN_VERSION) {
    throw new InviteTokenError(
      'TOKEN_VERSION',
      `invite token version ${version} is not supported (this build reads version ${INVITE_TOKEN_VERSION}); use matching mesh-inference versions`,
    );
  }
  const body = token.slice(PREFIX.length + 1);
  const bad = /[^A-Za-z0-9_-]/.exec(body);
  if (bad) throw new InviteTokenError('TOKEN_ENCODING', `invite token contains an invalid character ${JSON.stringify(bad[0])} at position ${PREFIX.length + 1 + bad.index}`);
  if (body.length % 4 === 1) throw new InviteTokenError('TOKEN_TRUNCATED', 'invite token is incomplete (was it cut off while copying?)');
  const buf = Buffer.from(body, 'base64url');
  if (buf.length < HEADER_BYTES + CRC_BYTES) throw new InviteTokenError('TOKEN_TRUNCATED', 'invite token is incomplete (was it cut off while copying?)');

  // Walk the layout to find where the checksum should be, before trusting any field.
  let end = HEADER_BYTES;
  const count = buf[HEADER_BYTES - 1]!;
  for (let i = 0; i < count && end < buf.length; i++) end += 1 + buf[end]!;
  if (end + CRC_BYTES > buf.length) throw new InviteTokenError('TOKEN_TRUNCATED', 'invite token is incomplete (was it cut off while copying?)');
  // Non-canonical base64url (changed unused low bits of the last character) decodes to the same bytes.
  if (buf.toString('base64url') !== body) throw new InviteTokenError('TOKEN_CORRUPT', 'invite token is damaged (checksum does not match)');
  if (end + CRC_BYTES < buf.length || buf.readUInt32BE(end) !== crc32(buf.subarray(0, end))) {
    throw new InviteTokenError('TOKEN_CORRUPT', 'invite token is damaged (checksum does not match)');
  }

  // The checksum holds: what follows can only fail for a token that was written wrongly, not damaged.
  if (buf[0] !== version) throw new InviteTokenError('TOKEN_INVALID', `invite token says version ${buf[0]} inside but ${version} outside`);
  if (count > MAX_ADDRS) throw new InviteTokenError('TOKEN_INVALID', `invite token lists ${count} addresses (at most ${MAX_ADDRS})`);
  let o = 1;
  const meshId = buf.subarray(o, (o += MESH_ID_BYTES)).toString('hex');
  const secret = new Uint8Array(buf.subarray(o, (o += MESH_SECRET_BYTES)));
  const inviter = asEndpointId(buf.subarray(o, (o += ENDPOINT_ID_BYTES)).toString('hex'));
  o += 1;
  const addrs: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = buf[o++]!;
    const a = buf.subarray(o, (o += len)).toString('utf8');
    if (!parseSocketAddr(a)) throw new InviteTokenError('TOKEN_INVALID', `invite token holds a bad address ${JSON.stringify(a)}`);
    addrs.push(a);
  }
  return { version, meshId, secret, inviter, addrs };
}

/** Parses "1.2.3.4:5" or "[::1]:5" (an IPv6 zone like "%eth0" allowed); null when it is neither. */
export function parseSocketAddr(addr: string): { host: string; port: number } | null {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):([0-9]{1,5})$/.exec(addr);
  if (!m) return null;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return null;
  if (m[1] !== undefined) {
    const [ip, zone] = m[1].split('%', 2) as [string, string | undefined];
    if (!isIPv6(ip) || (zone !== undefined && !/^[A-Za-z0-9_.-]{1,16}$/.test(zone))) return null;
    return { host: m[1], port };
  }
  return isIPv4(m[2]!) ? { host: m[2]!, port } : null;
}

/** Redacts the secret so an InviteToken can be logged. */
export function describeInvite(invite: InviteToken): { meshId: string; inviter: EndpointId; addrs: readonly string[] } {
  return { meshId: invite.meshId, inviter: invite.inviter, addrs: invite.addrs };
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ---- expiring invites (version 2) -------------------------------------------------------------------------
/*
 * An expiring invite carries NO mesh secret: a leaked one is worth nothing once it has expired. Wire form:
 * "mi2" + base64url(no padding) of
 *
 *   off  size  field
 *   0    1     version (2)
 *   1    16    mesh id
 *   17   32    inviter endpoint id (ed25519 public key)
 *   49   4     expiry, unix seconds (big endian)
 *   53   16    nonce (random: two invites of one second differ)
 *   69   32    invite key = HMAC-SHA256(mesh secret, INVITE_KEY_CONTEXT 0 mesh id 0 inviter 0 expiry 0 nonce hex)
 *   101  1     address count n, then n x (u8 length, "ip:port")
 *   ...  64    ed25519 signature by the inviter (its endpoint key) over INVITE_SIG_CONTEXT 0 and every byte above
 *   end  4     CRC-32 of every byte before it
 *
 * Only a holder of the mesh secret can mint the invite key, and a member checks it (and the expiry, and the
 * inviter's signature) with the secret it holds: `checkExpiringInvite`. The joiner proves the invite key in
 * its hello instead of the secret, and the node that admits it hands it the mesh secret (see the integration
 * notes in docs/node.md, "Expiring invites").
 */
export const EXPIRING_INVITE_VERSION = 2;
export const INVITE_KEY_CONTEXT = 'mesh-inference/2 invite key';
export const INVITE_SIG_CONTEXT = 'mesh-inference/2 invite signature';
const NONCE_BYTES = 16;
const SIG_BYTES = 64;
const V2_HEADER_BYTES = 1 + MESH_ID_BYTES + ENDPOINT_ID_BYTES + 4 + NONCE_BYTES + 32 + 1;
const PKCS8_ED25519 = Buffer.from('302e020100300506032b657004220420', 'hex');
const SPKI_ED25519 = Buffer.from('302a300506032b6570032100', 'hex');

export interface ExpiringInvite {
  readonly version: 2;
  readonly meshId: string;
  readonly inviter: EndpointId;
  /** Unix milliseconds (a whole second): no node admits with it after this. */
  readonly expiresAt: number;
  readonly nonce: Uint8Array;
  /** What the joiner proves in its hello instead of the mesh secret. */
  readonly inviteKey: Uint8Array;
  readonly addrs: readonly string[];
  readonly signature: Uint8Array;
  /** The signed bytes (context excluded), for verification. */
  readonly signed: Uint8Array;
}

/** The endpoint id (ed25519 public key, hex) of a 32-byte secret key, as node:crypto derives it. */
export function endpointIdOf(secretKey: Uint8Array): EndpointId {
  const pub = createPublicKey(ed25519Private(secretKey)).export({ format: 'der', type: 'spki' });
  return asEndpointId(Buffer.from(pub).subarray(SPKI_ED25519.length).toString('hex'));
}

export function deriveInviteKey(secret: Uint8Array, meshId: string, inviter: EndpointId, expiresSec: number, nonce: Uint8Array): Uint8Array {
  const mac = createHmac('sha256', secret);
  for (const part of [INVITE_KEY_CONTEXT, meshId, inviter, String(expiresSec), Buffer.from(nonce).toString('hex')]) {
    mac.update(part, 'utf8');
    mac.update(ZERO_BYTE);
  }
  return new Uint8Array(mac.digest());
}

/** Mints an expiring invite: the inviter's key signs it, the mesh secret derives its invite key. */
export function encodeExpiringInvite(init: {
  readonly meshId: string;
  readonly secret: Uint8Array;
  readonly secretKey: Uint8Array;
  readonly addrs: readonly string[];
  readonly ttlMs: number;
  readonly now?: number;
}): string {
  if (!/^[0-9a-f]{32}$/.test(init.meshId)) throw new InviteTokenError('TOKEN_INVALID', 'mesh id must be 32 lowercase hex characters');
  if (init.secret.length !== MESH_SECRET_BYTES) throw new InviteTokenError('TOKEN_INVALID', `mesh secret must be ${MESH_SECRET_BYTES} bytes`);
  if (!(init.ttlMs >= 1_000 && init.ttlMs <= 365 * 24 * 3600_000)) throw new InviteTokenError('TOKEN_INVALID', 'an invite lives between 1 s and 365 days');
  const inviter = endpointIdOf(init.secretKey);
  const expiresSec = Math.ceil(((init.now ?? Date.now()) + init.ttlMs) / 1000);
  const nonce = new Uint8Array(randomBytes(NONCE_BYTES));
  const addrs = inviteAddrs(init.addrs);
  const addrBytes = addrs.map((a) => Buffer.from(a, 'utf8'));
  const body = Buffer.alloc(V2_HEADER_BYTES + addrBytes.reduce((n, b) => n + 1 + b.length, 0));
  let o = 0;
  body[o++] = EXPIRING_INVITE_VERSION;
  o += Buffer.from(init.meshId, 'hex').copy(body, o);
  o += Buffer.from(inviter, 'hex').copy(body, o);
  o = body.writeUInt32BE(expiresSec, o);
  o += Buffer.from(nonce).copy(body, o);
  o += Buffer.from(deriveInviteKey(init.secret, init.meshId, inviter, expiresSec, nonce)).copy(body, o);
  body[o++] = addrBytes.length;
  for (const b of addrBytes) {
    body[o++] = b.length;
    o += b.copy(body, o);
  }
  const sig = cryptoSign(null, Buffer.concat([Buffer.from(INVITE_SIG_CONTEXT, 'utf8'), ZERO_BYTE, body]), ed25519Private(init.secretKey));
  const whole = Buffer.concat([body, sig, Buffer.alloc(CRC_BYTES)]);
  whole.writeUInt32BE(crc32(whole.subarray(0, whole.length - CRC_BYTES)), whole.length - CRC_BYTES);
  return `${PREFIX}${EXPIRING_INVITE_VERSION}${whole.toString('base64url')}`;
}

/** Parses an "mi2" token (its shape and checksum; not its signature or expiry: `checkExpiringInvite`). */
export function decodeExpiringInvite(text: string): ExpiringInvite {
  const token = typeof text === 'string' ? text.trim() : '';
  if (!token.startsWith(`${PREFIX}${EXPIRING_INVITE_VERSION}`)) throw new InviteTokenError('TOKEN_FOREIGN', 'not an expiring invite (it should start with "mi2")');
  const b64 = token.slice(PREFIX.length + 1);
  if (/[^A-Za-z0-9_-]/.test(b64) || b64.length % 4 === 1) throw new InviteTokenError('TOKEN_ENCODING', 'invite token contains invalid characters or was cut off');
  const buf = Buffer.from(b64, 'base64url');
  if (buf.toString('base64url') !== b64) throw new InviteTokenError('TOKEN_CORRUPT', 'invite token is damaged (checksum does not match)');
  if (buf.length < V2_HEADER_BYTES + SIG_BYTES + CRC_BYTES) throw new InviteTokenError('TOKEN_TRUNCATED', 'invite token is incomplete (was it cut off while copying?)');
  if (buf.readUInt32BE(buf.length - CRC_BYTES) !== crc32(buf.subarray(0, buf.length - CRC_BYTES))) throw new InviteTokenError('TOKEN_CORRUPT', 'invite token is damaged (checksum does not match)');
  if (buf[0] !== EXPIRING_INVITE_VERSION) throw new InviteTokenError('TOKEN_INVALID', `invite token says version ${buf[0]} inside but 2 outside`);
  let o = 1;
  const meshId = buf.subarray(o, (o += MESH_ID_BYTES)).toString('hex');
  const inviter = asEndpointId(buf.subarray(o, (o += ENDPOINT_ID_BYTES)).toString('hex'));
  const expiresSec = buf.readUInt32BE(o);
  o += 4;
  const nonce = new Uint8Array(buf.subarray(o, (o += NONCE_BYTES)));
  const inviteKey = new Uint8Array(buf.subarray(o, (o += 32)));
  const count = buf[o++]!;
  if (count > MAX_ADDRS) throw new InviteTokenError('TOKEN_INVALID', `invite token lists ${count} addresses (at most ${MAX_ADDRS})`);
  const addrs: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = buf[o++] ?? 0;
    const a = buf.subarray(o, (o += len)).toString('utf8');
    if (o > buf.length - SIG_BYTES - CRC_BYTES || !parseSocketAddr(a)) throw new InviteTokenError('TOKEN_INVALID', 'invite token holds a bad address');
    addrs.push(a);
  }
  if (o + SIG_BYTES + CRC_BYTES !== buf.length) throw new InviteTokenError('TOKEN_INVALID', 'invite token has bytes it does not explain');
  const signed = new Uint8Array(buf.subarray(0, o));
  const signature = new Uint8Array(buf.subarray(o, o + SIG_BYTES));
  return { version: 2, meshId, inviter, expiresAt: expiresSec * 1000, nonce, inviteKey, addrs, signature, signed };
}

/** The invite a hello presents (the token's signed bytes and signature), parsed as its token would be. Throws InviteTokenError. */
export function expiringInviteFromParts(signed: Uint8Array, signature: Uint8Array): ExpiringInvite {
  if (signature.length !== SIG_BYTES) throw new InviteTokenError('TOKEN_INVALID', `an invite signature is ${SIG_BYTES} bytes`);
  const whole = Buffer.concat([signed, signature, Buffer.alloc(CRC_BYTES)]);
  whole.writeUInt32BE(crc32(whole.subarray(0, whole.length - CRC_BYTES)), whole.length - CRC_BYTES);
  return decodeExpiringInvite(`${PREFIX}${EXPIRING_INVITE_VERSION}${whole.toString('base64url')}`);
}

/** Whether `secret` is the one the invite's key was minted with: what a joiner checks a welcome's secret by. */
export function inviteKeyMatches(invite: Pick<ExpiringInvite, 'meshId' | 'inviter' | 'expiresAt' | 'nonce' | 'inviteKey'>, secret: Uint8Array): boolean {
  const expected = deriveInviteKey(secret, invite.meshId, invite.inviter, Math.round(invite.expiresAt / 1000), invite.nonce);
  return invite.inviteKey.length === expected.length && timingSafeEqual(expected, invite.inviteKey);
}

export type InviteCheck = { readonly ok: true } | { readonly ok: false; readonly code: 'INVITE_EXPIRED' | 'INVITE_MESH' | 'INVITE_SIGNATURE' | 'INVITE_KEY'; readonly reason: string };

/**
 * What the admitting node decides about an invite presented in a hello: its mesh, its expiry (`now`), the
 * inviter's signature, and that its invite key derives from the mesh secret this node holds (so nobody but a
 * member could have minted it). A rotated secret voids every invite minted before the rotation.
 */
export function checkExpiringInvite(invite: Pick<ExpiringInvite, 'meshId' | 'inviter' | 'expiresAt' | 'nonce' | 'inviteKey' | 'signature' | 'signed'>, mesh: { readonly meshId: string; readonly secret: Uint8Array }, now: number): InviteCheck {
  if (invite.meshId !== mesh.meshId) return { ok: false, code: 'INVITE_MESH', reason: `the invite is for mesh ${invite.meshId.slice(0, 8)}, not ${mesh.meshId.slice(0, 8)}` };
  if (now >= invite.expiresAt) return { ok: false, code: 'INVITE_EXPIRED', reason: `the invite expired at ${new Date(invite.expiresAt).toISOString()}; ask a member for a new one (mesh-inference invite)` };
  let sigOk = false;
  try {
    const pub = createPublicKey({ key: Buffer.concat([SPKI_ED25519, Buffer.from(invite.inviter, 'hex')]), format: 'der', type: 'spki' });
    sigOk = cryptoVerify(null, Buffer.concat([Buffer.from(INVITE_SIG_CONTEXT, 'utf8'), ZERO_BYTE, invite.signed]), pub, invite.signature);
  } catch {
    sigOk = false;
  }
  if (!sigOk) return { ok: false, code: 'INVITE_SIGNATURE', reason: `the invite is not signed by ${invite.inviter.slice(0, 10)}` };
  if (!inviteKeyMatches(invite, mesh.secret)) {
    return { ok: false, code: 'INVITE_KEY', reason: 'the invite was not minted with this mesh\'s secret (rotated since?)' };
  }
  return { ok: true };
}

function ed25519Private(secretKey: Uint8Array) {
  if (secretKey.length !== 32) throw new InviteTokenError('TOKEN_INVALID', 'the secret key must be 32 bytes');
  return createPrivateKey({ key: Buffer.concat([PKCS8_ED25519, Buffer.from(secretKey)]), format: 'der', type: 'pkcs8' });
}

const ZERO_BYTE = new Uint8Array([0]);
