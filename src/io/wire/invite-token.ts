// The invite token: one copy-pasteable string that carries everything a new node needs to join a mesh
// (mesh id and secret, and where to reach the inviter). Decoding never throws anything but InviteTokenError.
import { randomBytes } from 'node:crypto';
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
