import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  createMeshId,
  createMeshSecret,
  decodeInviteToken,
  encodeInviteToken,
  inviteAddrs,
  InviteTokenError,
  parseSocketAddr,
} from '../src/io/wire/invite-token.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';

const hex = (n: number) => fc.uint8Array({ minLength: n, maxLength: n }).map((b) => Buffer.from(b).toString('hex'));
const ipv4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((p) => p.join('.'));
const ipv6 = fc.ipV6();
const port = fc.integer({ min: 1, max: 65535 });
const addr = fc.oneof(
  fc.tuple(ipv4, port).map(([h, p]) => `${h}:${p}`),
  fc.tuple(ipv6, port).map(([h, p]) => `[${h}]:${p}`),
);
const invite = fc.record({
  meshId: hex(16),
  secret: fc.uint8Array({ minLength: 32, maxLength: 32 }),
  inviter: hex(32).map(asEndpointId),
  addrs: fc.array(addr, { maxLength: 6 }),
});

function codeOf(f: () => unknown): string | undefined {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(InviteTokenError);
    const err = e as InviteTokenError;
    expect(err.message).not.toContain('\n');
    expect(err.message.length).toBeGreaterThan(10);
    return err.code;
  }
  return undefined;
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

describe('invite token', () => {
  it('round-trips', () => {
    fc.assert(
      fc.property(invite, (inv) => {
        const token = encodeInviteToken(inv);
        expect(token).toMatch(/^mi1[A-Za-z0-9_-]+$/);
        const back = decodeInviteToken(token);
        expect(back).toEqual({ version: 1, ...inv, secret: new Uint8Array(inv.secret) });
      }),
    );
  });

  it('tolerates surrounding whitespace from copy and paste', () => {
    const inv = { meshId: createMeshId(), secret: createMeshSecret(), inviter: asEndpointId('ab'.repeat(32)), addrs: ['192.168.1.5:7842'] };
    expect(decodeInviteToken(`  ${encodeInviteToken(inv)}\n`).addrs).toEqual(['192.168.1.5:7842']);
  });

  it('rejects any single changed character', () => {
    fc.assert(
      fc.property(invite, fc.nat(), fc.integer({ min: 1, max: 255 }), (inv, at, delta) => {
        const token = encodeInviteToken(inv);
        const i = at % token.length;
        // Usually a base64url character (the interesting case), sometimes any other character.
        const alphabet = B64 + '!. =+/é\n';
        const old = token[i]!;
        const pool = alphabet.split('').filter((c) => c !== old);
        const mutated = token.slice(0, i) + pool[delta % pool.length]! + token.slice(i + 1);
        if (mutated.trim() === token) return; // only whitespace at an end, trimmed on purpose
        expect(codeOf(() => decodeInviteToken(mutated))).toBeDefined();
      }),
      { numRuns: 2000 },
    );
  });

  it('rejects any single changed byte of the decoded payload', () => {
    fc.assert(
      fc.property(invite, fc.nat(), fc.integer({ min: 1, max: 255 }), (inv, at, x) => {
        const token = encodeInviteToken(inv);
        const buf = Buffer.from(token.slice(3), 'base64url');
        const j = at % buf.length;
        buf[j] = buf[j]! ^ x;
        expect(codeOf(() => decodeInviteToken('mi1' + buf.toString('base64url')))).toBeDefined();
      }),
      { numRuns: 2000 },
    );
  });

  it('rejects every truncation', () => {
    fc.assert(
      fc.property(invite, fc.nat(), (inv, at) => {
        const token = encodeInviteToken(inv);
        const cut = token.slice(0, at % token.length);
        const code = codeOf(() => decodeInviteToken(cut));
        expect(code).toBeDefined();
        if (cut.length > 3) expect(['TOKEN_TRUNCATED', 'TOKEN_CORRUPT']).toContain(code);
      }),
      { numRuns: 1000 },
    );
    const token = encodeInviteToken({ meshId: createMeshId(), secret: createMeshSecret(), inviter: asEndpointId('cd'.repeat(32)), addrs: ['10.0.0.1:1'] });
    expect(codeOf(() => decodeInviteToken(token.slice(0, 40)))).toBe('TOKEN_TRUNCATED');
  });

  it('names foreign, future and empty tokens', () => {
    expect(codeOf(() => decodeInviteToken(''))).toBe('TOKEN_EMPTY');
    expect(codeOf(() => decodeInviteToken('   '))).toBe('TOKEN_EMPTY');
    expect(codeOf(() => decodeInviteToken('endpointabc123'))).toBe('TOKEN_FOREIGN');
    expect(codeOf(() => decodeInviteToken('mi2AAAA'))).toBe('TOKEN_VERSION');
    expect(codeOf(() => decodeInviteToken('mi1AA$A'))).toBe('TOKEN_ENCODING');
    expect(codeOf(() => decodeInviteToken(42 as unknown as string))).toBe('TOKEN_EMPTY');
  });

  it('refuses to write what it cannot read back', () => {
    const base = { meshId: createMeshId(), secret: createMeshSecret(), inviter: asEndpointId('ef'.repeat(32)), addrs: [] as string[] };
    expect(codeOf(() => encodeInviteToken({ ...base, addrs: ['localhost:80'] }))).toBe('TOKEN_INVALID');
    expect(codeOf(() => encodeInviteToken({ ...base, secret: new Uint8Array(3) }))).toBe('TOKEN_INVALID');
    expect(codeOf(() => encodeInviteToken({ ...base, inviter: asEndpointId('xyz') }))).toBe('TOKEN_INVALID');
  });

  it('parses and collects addresses', () => {
    expect(parseSocketAddr('1.2.3.4:5')).toEqual({ host: '1.2.3.4', port: 5 });
    expect(parseSocketAddr('[fe80::1%eth0]:7842')).toEqual({ host: 'fe80::1%eth0', port: 7842 });
    expect(parseSocketAddr('1.2.3.4:0')).toBeNull();
    expect(parseSocketAddr('1.2.3.4')).toBeNull();
    expect(parseSocketAddr('::1:80')).toBeNull();
    expect(inviteAddrs(['192.168.1.2:7842', 'junk', '192.168.1.2:7842'], '203.0.113.9:7842')).toEqual(['192.168.1.2:7842', '203.0.113.9:7842']);
    expect(inviteAddrs(['10.0.0.1:1'], null)).toEqual(['10.0.0.1:1']);
  });
});
