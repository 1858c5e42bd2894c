import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { checkHello, helloProof, makeHello, verifyHelloProof } from '../src/io/wire/mesh-auth.ts';
import { asEndpointId, PROTOCOL_VERSION } from '../src/machines/mesh-types.ts';

const A = asEndpointId('a1'.repeat(32));
const B = asEndpointId('b2'.repeat(32));
const C = asEndpointId('c3'.repeat(32));
const secret = new Uint8Array(32).fill(7);
const other = new Uint8Array(32).fill(8);
const facts = { role: 'auto' as const, vramBytes: 1e9, model: null };

describe('hello proof', () => {
  it('verifies for the right secret and pair only', () => {
    const p = helloProof(secret, A, B);
    expect(p.length).toBe(32);
    expect(verifyHelloProof(secret, A, B, p)).toBe(true);
    expect(verifyHelloProof(other, A, B, p)).toBe(false);
    expect(verifyHelloProof(secret, B, A, p)).toBe(false); // reflected back to its sender
    expect(verifyHelloProof(secret, A, C, p)).toBe(false); // replayed to a third node
    expect(verifyHelloProof(secret, A, B, p.subarray(0, 31))).toBe(false);
    expect(verifyHelloProof(secret, A, B, 'x' as unknown as Uint8Array)).toBe(false);
  });

  it('any flipped bit fails', () => {
    fc.assert(
      fc.property(fc.nat(255), fc.integer({ min: 1, max: 255 }), (i, x) => {
        const p = helloProof(secret, A, B);
        p[i % 32] = p[i % 32]! ^ x;
        expect(verifyHelloProof(secret, A, B, p)).toBe(false);
      }),
    );
  });

  it('admits a good hello and refuses with a reason', () => {
    expect(checkHello(makeHello(facts, secret, A, B), secret, B, A)).toEqual({ ok: true });
    const wrong = checkHello(makeHello(facts, other, A, B), secret, B, A);
    expect(wrong).toMatchObject({ ok: false, code: 'HELLO_PROOF' });
    expect(!wrong.ok && wrong.reason).toMatch(/wrong mesh secret/);
    const version = checkHello(makeHello(facts, secret, A, B, PROTOCOL_VERSION + 1), secret, B, A);
    expect(version).toMatchObject({ ok: false, code: 'HELLO_VERSION' });
    expect(!version.ok && version.reason).toMatch(/incompatible protocol version/);
    // A hello claiming another id than the one QUIC authenticated.
    expect(checkHello(makeHello(facts, secret, C, B), secret, B, A)).toMatchObject({ ok: false, code: 'HELLO_ID' });
  });
});
