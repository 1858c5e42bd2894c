// fast-check arbitraries for every control message kind, as the wire validator accepts them.
import fc from 'fast-check';
import { asEndpointId, type Announcement, type EndpointId, type ModelIdentity, type RolePreference } from '../../src/machines/mesh-types.ts';
import type { MeshMessage } from '../../src/machines/protocol.ts';

// 32 random bytes as lowercase hex, like an ed25519 public key.
export const endpointIdArb: fc.Arbitrary<EndpointId> = fc
  .uint8Array({ minLength: 32, maxLength: 32 })
  .map((b) => asEndpointId(Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')));
export const roleArb: fc.Arbitrary<RolePreference> = fc.constantFrom('auto', 'host', 'worker', 'client');
const countArb = fc.maxSafeNat();
const nameArb = fc.string({ maxLength: 40, unit: 'grapheme' });

export const modelArb: fc.Arbitrary<ModelIdentity> = fc.record({
  name: nameArb,
  bytes: countArb,
  fingerprint: fc.string({ minLength: 1, maxLength: 64 }),
});

export const announcementArb: fc.Arbitrary<Announcement> = fc.record({
  id: endpointIdArb,
  epoch: countArb,
  seq: countArb,
  name: nameArb,
  role: roleArb,
  vramBytes: countArb,
  model: fc.option(modelArb, { nil: null }),
  version: fc.nat(1000),
  serving: fc.boolean(),
  addrs: fc.array(fc.string({ minLength: 1, maxLength: 30 }), { maxLength: 4 }),
  connectedTo: fc.array(endpointIdArb, { maxLength: 4 }),
  sig: fc.uint8Array({ minLength: 64, maxLength: 64 }),
});

export const messageArb: fc.Arbitrary<MeshMessage> = fc.oneof(
  fc.record({
    type: fc.constant('hello' as const),
    version: fc.nat(1000),
    id: endpointIdArb,
    role: roleArb,
    vramBytes: countArb,
    model: fc.option(modelArb, { nil: null }),
    proof: fc.uint8Array({ minLength: 1, maxLength: 64 }),
  }),
  fc.record({ type: fc.constant('gossip' as const), announcements: fc.array(announcementArb, { maxLength: 4 }) }),
  fc.record({ type: fc.constant('heartbeat' as const), n: countArb }),
  fc.record({ type: fc.constant('heartbeat-ack' as const), n: countArb }),
  fc.record({ type: fc.constant('leaving' as const), reason: fc.string({ maxLength: 200 }) }),
  fc.record({ type: fc.constant('rpc-ready' as const), planId: fc.string({ minLength: 1, maxLength: 32 }) }),
);

/** Cuts `bytes` at the given (any, possibly repeated or out-of-range) positions into consecutive chunks. */
export function splitAt(bytes: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Uint8Array[] = [];
  let from = 0;
  for (const p of points) {
    chunks.push(bytes.subarray(from, p));
    from = p;
  }
  chunks.push(bytes.subarray(from));
  return chunks;
}

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
