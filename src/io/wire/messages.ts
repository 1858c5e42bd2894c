// Validates decoded msgpack values into the MeshMessage union, field by field, at the wire boundary:
// whatever a peer sends, the machines only ever see well-typed messages; anything else is a typed error.
import { asEndpointId, type Announcement, type EndpointId, type ModelIdentity, type RolePreference } from '../../machines/mesh-types.ts';
import { isKvCacheType, type KvSizing } from '../../machines/kv-cache.ts';
import type { HelloInvite, MeshMessage, MeshMessageType } from '../../machines/protocol.ts';

/** Stable codes a caller can act on (all of them mean: close this peer with the message as the reason). */
export type WireErrorCode = 'frame-too-large' | 'malformed-msgpack' | 'truncated-frame' | 'unknown-message' | 'bad-field';

/** Base of every error the wire codec reports. */
export class WireError extends Error {
  override readonly name: string = 'WireError';
  constructor(
    readonly code: WireErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** The value has no known `type` tag (or is not a map at all). */
export class UnknownMessageError extends WireError {
  override readonly name = 'UnknownMessageError';
  constructor(readonly messageType: string) {
    super('unknown-message', `unknown message type ${messageType}`);
  }
}

/** A known message with a missing, mistyped or out-of-range field; `field` is its path, e.g. `announcements[2].vramBytes`. */
export class BadFieldError extends WireError {
  override readonly name = 'BadFieldError';
  constructor(
    readonly messageType: MeshMessageType,
    readonly field: string,
    readonly problem: string,
  ) {
    super('bad-field', `${messageType}: field ${field} ${problem}`);
  }
}

/** Bounds that keep one peer from making us hold absurd amounts of state; generous for any real mesh. */
export const LIMITS = {
  shortString: 256,
  reason: 1024,
  announcements: 1024,
  addrs: 64,
  connectedTo: 1024,
  proofBytes: 256,
  /** An announcement's ed25519 signature: exactly this many bytes. */
  signatureBytes: 64,
  /** The signed bytes of an expiring invite (102 bytes of header, up to 16 addresses of 65). */
  inviteBytes: 1200,
  /** The mesh secret of a welcome: exactly this many bytes. */
  secretBytes: 32,
  /** Members a rekey or welcome may name as removed. */
  removed: 256,
} as const;

const MESSAGE_TYPES: readonly MeshMessageType[] = ['hello', 'gossip', 'heartbeat', 'heartbeat-ack', 'leaving', 'rpc-ready', 'welcome', 'rekey'];
const ROLES: readonly RolePreference[] = ['auto', 'host', 'worker', 'client'];
// iroh endpoint ids are ed25519 public keys written as lowercase hex.
const ENDPOINT_ID = /^[0-9a-f]{64}$/;

export type ParseResult = { readonly ok: true; readonly message: MeshMessage } | { readonly ok: false; readonly error: WireError };

/** Never throws: the validated message, or the typed error saying what was wrong. */
export function parseMessage(value: unknown): ParseResult {
  try {
    return { ok: true, message: validateMessage(value) };
  } catch (error) {
    if (error instanceof WireError) return { ok: false, error };
    // Validation only throws WireErrors; anything else is a bug here, still reported, never a crash.
    return { ok: false, error: new WireError('bad-field', `validation failed: ${String(error)}`) };
  }
}

/**
 * Validates `value` into a MeshMessage, or throws UnknownMessageError / BadFieldError. Fields that are
 * not part of the message are dropped (a newer peer may send more), so the result holds only known fields.
 */
export function validateMessage(value: unknown): MeshMessage {
  if (!isRecord(value)) throw new UnknownMessageError(`(not a map: ${describe(value)})`);
  const type = value['type'];
  if (typeof type !== 'string' || !(MESSAGE_TYPES as readonly string[]).includes(type)) {
    throw new UnknownMessageError(typeof type === 'string' ? JSON.stringify(type.slice(0, 64)) : `(type is ${describe(type)})`);
  }
  const f = new Fields(type as MeshMessageType);
  switch (type as MeshMessageType) {
    case 'hello':
      return {
        type: 'hello',
        version: f.count(value, 'version'),
        id: f.endpointId(value, 'id'),
        role: f.role(value, 'role'),
        vramBytes: f.count(value, 'vramBytes'),
        model: f.model(value, 'model'),
        proof: f.bytes(value, 'proof', LIMITS.proofBytes),
        // Absent (or nil) unless the sender joins with an expiring invite.
        ...(value['invite'] === undefined || value['invite'] === null ? {} : { invite: f.invite(value, 'invite') }),
      };
    case 'gossip':
      return {
        type: 'gossip',
        announcements: f.array(value, 'announcements', LIMITS.announcements, (item, path) =>
          f.announcement(f.record(item, path), path),
        ),
      };
    case 'heartbeat':
      return { type: 'heartbeat', n: f.count(value, 'n') };
    case 'heartbeat-ack':
      return { type: 'heartbeat-ack', n: f.count(value, 'n') };
    case 'leaving':
      return { type: 'leaving', reason: f.string(value, 'reason', LIMITS.reason) };
    case 'rpc-ready':
      return { type: 'rpc-ready', planId: f.string(value, 'planId', LIMITS.shortString, true) };
    case 'welcome':
      return {
        type: 'welcome',
        meshId: f.meshId(value, 'meshId'),
        secret: f.secret(value, 'secret'),
        // Absent from a node before rotation existed: epoch 0, nobody removed.
        ...(value['keyEpoch'] === undefined ? {} : { keyEpoch: f.count(value, 'keyEpoch') }),
        ...(value['removed'] === undefined ? {} : { removed: f.array(value, 'removed', LIMITS.removed, (v, p) => f.endpointIdValue(v, p)) }),
      };
    case 'rekey':
      return {
        type: 'rekey',
        meshId: f.meshId(value, 'meshId'),
        keyEpoch: f.count(value, 'keyEpoch'),
        secret: f.secret(value, 'secret'),
        removed: f.array(value, 'removed', LIMITS.removed, (v, p) => f.endpointIdValue(v, p)),
        issuer: f.endpointId(value, 'issuer'),
        issuedAt: f.count(value, 'issuedAt'),
        sig: f.signature(value, 'sig'),
      };
  }
}

/** Validates one announcement (also usable on its own, e.g. for announcements from other sources). */
export function validateAnnouncement(value: unknown, messageType: MeshMessageType = 'gossip', path = 'announcement'): Announcement {
  const f = new Fields(messageType);
  return f.announcement(f.record(value, path), path);
}

// Field readers for one message: each names the path of what it rejects.
class Fields {
  constructor(private readonly type: MeshMessageType) {}

  bad(path: string, problem: string): never {
    throw new BadFieldError(this.type, path, problem);
  }

  record(value: unknown, path: string): Record<string, unknown> {
    return isRecord(value) ? value : this.bad(path, `must be a map, got ${describe(value)}`);
  }

  /** A non-negative safe integer: versions, counters, byte sizes. */
  count(obj: Record<string, unknown>, key: string, path = key): number {
    const v = obj[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
      return this.bad(path, `must be a non-negative integer, got ${describe(v)}`);
    }
    return v;
  }

  string(obj: Record<string, unknown>, key: string, max: number, nonEmpty = false, path = key): string {
    const v = obj[key];
    if (typeof v !== 'string') return this.bad(path, `must be a string, got ${describe(v)}`);
    if (v.length > max) return this.bad(path, `is longer than ${max} characters`);
    if (nonEmpty && v.length === 0) return this.bad(path, 'must not be empty');
    return v;
  }

  boolean(obj: Record<string, unknown>, key: string, path = key): boolean {
    const v = obj[key];
    return typeof v === 'boolean' ? v : this.bad(path, `must be a boolean, got ${describe(v)}`);
  }

  endpointIdValue(v: unknown, path: string): EndpointId {
    if (typeof v !== 'string' || !ENDPOINT_ID.test(v)) {
      return this.bad(path, `must be an endpoint id (64 lowercase hex digits), got ${describe(v)}`);
    }
    return asEndpointId(v);
  }

  endpointId(obj: Record<string, unknown>, key: string, path = key): EndpointId {
    return this.endpointIdValue(obj[key], path);
  }

  role(obj: Record<string, unknown>, key: string, path = key): RolePreference {
    const v = obj[key];
    if (typeof v !== 'string' || !(ROLES as readonly string[]).includes(v)) {
      return this.bad(path, `must be one of ${ROLES.join(', ')}, got ${describe(v)}`);
    }
    return v as RolePreference;
  }

  /** Bytes arrive as Buffer or Uint8Array; copied so the message never pins the frame's memory. */
  bytes(obj: Record<string, unknown>, key: string, max: number, path = key): Uint8Array {
    const v = obj[key];
    if (!(v instanceof Uint8Array)) return this.bad(path, `must be bytes, got ${describe(v)}`);
    if (v.length === 0 || v.length > max) return this.bad(path, `must hold 1 to ${max} bytes, got ${v.length}`);
    return new Uint8Array(v);
  }

  meshId(obj: Record<string, unknown>, key: string, path = key): string {
    const v = this.string(obj, key, 32, true, path);
    return /^[0-9a-f]{32}$/.test(v) ? v : this.bad(path, 'must be 32 lowercase hex digits');
  }

  /** A mesh secret: exactly LIMITS.secretBytes bytes. */
  secret(obj: Record<string, unknown>, key: string, path = key): Uint8Array {
    const v = this.bytes(obj, key, LIMITS.secretBytes, path);
    return v.length === LIMITS.secretBytes ? v : this.bad(path, `must hold ${LIMITS.secretBytes} bytes, got ${v.length}`);
  }

  signature(obj: Record<string, unknown>, key: string, path = key): Uint8Array {
    const v = this.bytes(obj, key, LIMITS.signatureBytes, path);
    return v.length === LIMITS.signatureBytes ? v : this.bad(path, `must hold ${LIMITS.signatureBytes} bytes, got ${v.length}`);
  }

  invite(obj: Record<string, unknown>, key: string, path = key): HelloInvite {
    const v = this.record(obj[key], path);
    return { signed: this.bytes(v, 'signed', LIMITS.inviteBytes, `${path}.signed`), signature: this.signature(v, 'signature', `${path}.signature`) };
  }

  array<T>(obj: Record<string, unknown>, key: string, max: number, item: (v: unknown, path: string) => T, path = key): T[] {
    const v = obj[key];
    if (!Array.isArray(v)) return this.bad(path, `must be an array, got ${describe(v)}`);
    if (v.length > max) return this.bad(path, `holds more than ${max} items`);
    return v.map((x, i) => item(x, `${path}[${i}]`));
  }

  model(obj: Record<string, unknown>, key: string, path = key): ModelIdentity | null {
    const v = obj[key];
    if (v === null) return null;
    const m = this.record(v, path);
    return {
      name: this.string(m, 'name', LIMITS.shortString, false, `${path}.name`),
      bytes: this.count(m, 'bytes', `${path}.bytes`),
      fingerprint: this.string(m, 'fingerprint', LIMITS.shortString, true, `${path}.fingerprint`),
    };
  }

  kv(obj: Record<string, unknown>, key: string, path = key): KvSizing {
    const v = this.record(obj[key], path);
    const cacheType = this.string(v, 'cacheType', 16, true, `${path}.cacheType`);
    const flashAttn = this.string(v, 'flashAttn', 8, true, `${path}.flashAttn`);
    if (!isKvCacheType(cacheType)) return this.bad(`${path}.cacheType`, `must be a llama.cpp KV cache type, got ${describe(cacheType)}`);
    if (flashAttn !== 'on' && flashAttn !== 'off' && flashAttn !== 'auto') return this.bad(`${path}.flashAttn`, `must be on, off or auto, got ${describe(flashAttn)}`);
    return {
      ctxSize: this.count(v, 'ctxSize', `${path}.ctxSize`),
      parallel: this.count(v, 'parallel', `${path}.parallel`),
      cacheType,
      flashAttn,
      layers: this.count(v, 'layers', `${path}.layers`),
      bytes: this.count(v, 'bytes', `${path}.bytes`),
    };
  }

  announcement(a: Record<string, unknown>, path: string): Announcement {
    const at = (k: string) => `${path}.${k}`;
    return {
      id: this.endpointId(a, 'id', at('id')),
      epoch: this.count(a, 'epoch', at('epoch')),
      seq: this.count(a, 'seq', at('seq')),
      name: this.string(a, 'name', LIMITS.shortString, false, at('name')),
      role: this.role(a, 'role', at('role')),
      vramBytes: this.count(a, 'vramBytes', at('vramBytes')),
      model: this.model(a, 'model', at('model')),
      version: this.count(a, 'version', at('version')),
      serving: this.boolean(a, 'serving', at('serving')),
      addrs: this.array(a, 'addrs', LIMITS.addrs, (v, p) => this.string({ v }, 'v', LIMITS.shortString, true, p), at('addrs')),
      connectedTo: this.array(a, 'connectedTo', LIMITS.connectedTo, (v, p) => this.endpointIdValue(v, p), at('connectedTo')),
      // Protocol 3: optional; its numbers are checked here, its sense by the election (src/machines/kv-cache.ts).
      ...(a['kv'] === undefined || a['kv'] === null ? {} : { kv: this.kv(a, 'kv', at('kv')) }),
      // Required since protocol 2; whether it is valid is the receiver's check (src/io/wire/announcement-signature.ts).
      sig: this.signature(a, 'sig', at('sig')),
    };
  }
}

/** A plain map as msgpackr decodes it (not an array, Date, Set, Buffer or other extension object). */
function isRecord(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

// A short description of a bad value for error messages: never the whole (possibly huge) value.
function describe(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'nothing';
  if (Array.isArray(v)) return 'an array';
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return String(v);
  if (typeof v === 'object') return `a ${(Object.getPrototypeOf(v) as { constructor?: { name?: string } } | null)?.constructor?.name ?? 'map'}`;
  return typeof v;
}

/** Alias of validateMessage for callers that validate values decoded elsewhere; throws only WireErrors. */
export const decodeMeshMessage: (value: unknown) => MeshMessage = validateMessage;
