// Field-by-field validation of control messages: every bad field is named, nothing else gets through.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BadFieldError, parseMessage, UnknownMessageError, validateMessage } from '../src/io/wire/messages.ts';
import { messageArb } from './support/wire-arbitraries.ts';

const ID = 'ab'.repeat(32);
const announcement = () => ({
  id: ID,
  epoch: 1,
  seq: 2,
  name: 'box',
  role: 'auto',
  vramBytes: 8e9,
  model: { name: 'glm', bytes: 5e9, fingerprint: 'f'.repeat(64) },
  version: 1,
  serving: false,
  addrs: ['10.0.0.1:4433'],
  connectedTo: ['cd'.repeat(32)],
});
const hello = () => ({ type: 'hello', version: 1, id: ID, role: 'host', vramBytes: 0, model: null, proof: new Uint8Array(32) });

/** Sets `path` (dotted, with [i] for array items) in a fresh message to `value`. */
function withField(message: Record<string, unknown>, path: string, value: unknown): Record<string, unknown> {
  const keys = path.replace(/\[(\d+)\]/g, '.$1').split('.');
  let at: Record<string, unknown> = message;
  for (const k of keys.slice(0, -1)) at = at[k] as Record<string, unknown>;
  const last = keys[keys.length - 1] as string;
  if (value === undefined) delete at[last];
  else at[last] = value;
  return message;
}

describe('validateMessage', () => {
  it('accepts every generated message unchanged', () => {
    fc.assert(
      fc.property(messageArb, (m) => {
        expect(validateMessage(m)).toEqual(m);
      }),
      { numRuns: 300 },
    );
  });

  it('drops fields it does not know (a newer peer may send more)', () => {
    expect(validateMessage({ type: 'heartbeat', n: 3, extra: 'x' })).toEqual({ type: 'heartbeat', n: 3 });
  });

  const badCases: Array<[string, () => Record<string, unknown>, string, unknown]> = [
    ['hello', hello, 'version', -1],
    ['hello', hello, 'version', 1.5],
    ['hello', hello, 'id', 'AB'.repeat(32)],
    ['hello', hello, 'id', 'ab'],
    ['hello', hello, 'role', 'king'],
    ['hello', hello, 'vramBytes', '8GB'],
    ['hello', hello, 'model', 'glm'],
    ['hello', hello, 'proof', 'c2VjcmV0'],
    ['hello', hello, 'proof', new Uint8Array(0)],
    ['hello', hello, 'proof', undefined],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].vramBytes', -5],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].epoch', 2 ** 60],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].model.bytes', null],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].model.fingerprint', ''],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].serving', 1],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].addrs[0]', 7],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0].connectedTo[0]', 'me'],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements[0]', [1]],
    ['gossip', () => ({ type: 'gossip', announcements: [announcement()] }), 'announcements', {}],
    ['heartbeat', () => ({ type: 'heartbeat', n: 1 }), 'n', Number.NaN],
    ['heartbeat-ack', () => ({ type: 'heartbeat-ack', n: 1 }), 'n', 10n],
    ['leaving', () => ({ type: 'leaving', reason: 'x' }), 'reason', 'x'.repeat(5000)],
    ['rpc-ready', () => ({ type: 'rpc-ready', planId: 'p' }), 'planId', ''],
  ];
  it.each(badCases)('%s: names the bad field %s', (type, make, path, value) => {
    const result = parseMessage(withField(make(), path, value));
    expect(result.ok).toBe(false);
    if (result.ok) return;
    expect(result.error).toBeInstanceOf(BadFieldError);
    expect(result.error).toMatchObject({ name: 'BadFieldError', code: 'bad-field', messageType: type, field: path });
    expect(result.error.message).toContain(path);
  });

  it('bounds list sizes', () => {
    const many = { type: 'gossip', announcements: Array.from({ length: 1025 }, announcement) };
    expect(parseMessage(many)).toMatchObject({ ok: false, error: { code: 'bad-field', field: 'announcements' } });
  });

  it.each([[null], [42], ['hello'], [[{ type: 'hello' }]], [{}], [{ type: 'teleport' }], [{ type: 7 }], [new Date(0)], [new Map()]])(
    'refuses %o as an unknown message',
    (value) => {
      const result = parseMessage(value);
      expect(result).toMatchObject({ ok: false, error: { name: 'UnknownMessageError', code: 'unknown-message' } });
      if (!result.ok) expect(result.error).toBeInstanceOf(UnknownMessageError);
    },
  );
});
