// The framing layer: round trips under any chunking, a hard size cap, and no input that can make it throw.
import { isDeepStrictEqual } from 'node:util';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import {
  DEFAULT_MAX_FRAME_BYTES,
  encodeFrame,
  FrameDecoder,
  FrameTooLargeError,
  MalformedMsgpackError,
  TruncatedFrameError,
} from '../src/io/wire/frame-codec.ts';
import { BadFieldError, UnknownMessageError, validateMessage, WireError } from '../src/io/wire/messages.ts';
import type { MeshMessage } from '../src/machines/protocol.ts';
import { concat, messageArb, splitAt } from './support/wire-arbitraries.ts';

const packr = new Packr({ useRecords: false });
const frameOf = (value: unknown): Uint8Array => {
  const body = packr.pack(value);
  const frame = new Uint8Array(4 + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  return frame;
};

const WIRE_CODES = ['frame-too-large', 'malformed-msgpack', 'truncated-frame', 'unknown-message', 'bad-field'];

// Plain checks in the hot loops: vitest's expect costs too much at 40,000 runs.
function check(condition: boolean, what: string): void {
  if (!condition) throw new Error(what);
}

/** Feeds chunks and checks the decoder's contract; returns everything it produced. */
function feed(decoder: FrameDecoder, chunks: readonly Uint8Array[]): { messages: MeshMessage[]; error: WireError | null } {
  const messages: MeshMessage[] = [];
  let error: WireError | null = null;
  for (const chunk of chunks) {
    const result = decoder.push(chunk);
    messages.push(...result.messages);
    if (result.error !== null) {
      if (error === null) error = result.error;
      check(result.error === error, 'a broken stream keeps reporting the same error');
    }
  }
  return { messages, error };
}

describe('FrameDecoder round trips', () => {
  it('decodes every message kind, in any sequence, under arbitrary chunk splits', () => {
    fc.assert(
      fc.property(fc.array(messageArb, { maxLength: 6 }), fc.array(fc.nat(), { maxLength: 12 }), (messages, cuts) => {
        const stream = concat(messages.map((m) => encodeFrame(m)));
        const decoder = new FrameDecoder();
        const out = feed(decoder, splitAt(stream, cuts));
        expect(out.error).toBeNull();
        expect(out.messages).toEqual(messages);
        expect(decoder.end()).toBeNull();
      }),
      { numRuns: 500 },
    );
  });

  it('gives bytes back as plain Uint8Arrays that do not alias the input', () => {
    const proof = new Uint8Array([1, 2, 3, 4]);
    const hello: MeshMessage = { type: 'hello', version: 1, id: 'a'.repeat(64) as never, role: 'auto', vramBytes: 5, model: null, proof };
    const frame = encodeFrame(hello);
    const out = new FrameDecoder().push(frame);
    const got = out.messages[0];
    if (got?.type !== 'hello') throw new Error('expected a hello');
    expect(Object.getPrototypeOf(got.proof)).toBe(Uint8Array.prototype);
    expect(got.proof).toEqual(proof);
    frame.fill(0);
    expect(got.proof).toEqual(proof);
  });

  it('one byte at a time works too', () => {
    const msgs: MeshMessage[] = [{ type: 'heartbeat', n: 7 }, { type: 'leaving', reason: 'bye' }];
    const stream = concat(msgs.map((m) => encodeFrame(m)));
    const out = feed(new FrameDecoder(), [...stream].map((b) => new Uint8Array([b])));
    expect(out).toEqual({ messages: msgs, error: null });
  });
});

describe('FrameDecoder errors', () => {
  it('refuses an oversized frame from its length prefix alone, before buffering the body', () => {
    const decoder = new FrameDecoder();
    const prefix = new Uint8Array(4);
    new DataView(prefix.buffer).setUint32(0, DEFAULT_MAX_FRAME_BYTES + 1);
    const { error } = decoder.push(prefix);
    expect(error).toBeInstanceOf(FrameTooLargeError);
    expect(error).toMatchObject({ name: 'FrameTooLargeError', code: 'frame-too-large', frameBytes: DEFAULT_MAX_FRAME_BYTES + 1 });
  });

  it('honours a configured cap, on decode and encode', () => {
    const msg: MeshMessage = { type: 'leaving', reason: 'x'.repeat(100) };
    expect(new FrameDecoder({ maxFrameBytes: 50 }).push(encodeFrame(msg)).error?.code).toBe('frame-too-large');
    expect(new FrameDecoder({ maxFrameBytes: 500 }).push(encodeFrame(msg)).messages).toEqual([msg]);
    expect(() => encodeFrame(msg, { maxFrameBytes: 50 })).toThrow(FrameTooLargeError);
    expect(() => new FrameDecoder({ maxFrameBytes: 0 })).toThrow(RangeError);
  });

  it('reports malformed msgpack: a reserved byte, trailing bytes, an empty frame, non-string map keys', () => {
    const cases = [
      new Uint8Array([0, 0, 0, 2, 0xd9, 0x05]), // a str8 that promises 5 bytes and has none
      concat([new Uint8Array([0, 0, 0, 2]), new Uint8Array([0xc0, 0xc0])]),
      new Uint8Array([0, 0, 0, 0]),
      new Uint8Array([0, 0, 0, 4, 0x81, 0x91, 0x01, 0x02]),
    ];
    for (const frame of cases) {
      const { error } = new FrameDecoder().push(frame);
      expect(error).toBeInstanceOf(MalformedMsgpackError);
      expect(error?.code).toBe('malformed-msgpack');
    }
  });

  it('reports an unknown message type and a bad field by name', () => {
    const unknown = new FrameDecoder().push(frameOf({ type: 'teleport', n: 1 })).error;
    expect(unknown).toBeInstanceOf(UnknownMessageError);
    expect(unknown?.code).toBe('unknown-message');

    const bad = new FrameDecoder().push(frameOf({ type: 'heartbeat', n: -1 })).error;
    expect(bad).toBeInstanceOf(BadFieldError);
    expect(bad).toMatchObject({ code: 'bad-field', field: 'n', messageType: 'heartbeat' });
  });

  it('returns the messages before an error, then stays broken', () => {
    const decoder = new FrameDecoder();
    const good = encodeFrame({ type: 'heartbeat', n: 1 });
    const result = decoder.push(concat([good, frameOf({ type: 'nope' }), good]));
    expect(result.messages).toEqual([{ type: 'heartbeat', n: 1 }]);
    expect(result.error?.code).toBe('unknown-message');
    expect(decoder.push(good)).toEqual({ messages: [], error: result.error });
    expect(decoder.error).toBe(result.error);
  });

  it('reports a stream that ends inside a frame', () => {
    const decoder = new FrameDecoder();
    const frame = encodeFrame({ type: 'heartbeat', n: 1 });
    expect(decoder.push(frame.subarray(0, frame.length - 1)).error).toBeNull();
    const end = decoder.end();
    expect(end).toBeInstanceOf(TruncatedFrameError);
    expect(end?.code).toBe('truncated-frame');
  });
});

describe('FrameDecoder never crashes (100,000 hostile inputs in all)', () => {
  // The decoder's whole promise on hostile input: push returns (never throws), errors are typed wire
  // errors, and anything it does deliver is a valid message.
  const survives = (chunks: readonly Uint8Array[], maxFrameBytes?: number) => {
    const decoder = new FrameDecoder(maxFrameBytes === undefined ? {} : { maxFrameBytes });
    const out = feed(decoder, chunks);
    for (const m of out.messages) check(isDeepStrictEqual(validateMessage(m), m), 'a delivered message is not valid');
    const end = decoder.end();
    for (const e of [out.error, end]) {
      if (e !== null) check(e instanceof WireError && WIRE_CODES.includes(e.code), `not a typed wire error: ${String(e)}`);
    }
  };

  it('survives 40,000 random byte streams, arbitrarily chunked', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.array(fc.nat(), { maxLength: 4 }), (bytes, cuts) =>
        survives(splitAt(bytes, cuts), 1024),
      ),
      { numRuns: 40_000 },
    );
  });

  it('survives 30,000 random msgpack bodies behind a correct length prefix', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 64 }), (body) => {
        const frame = new Uint8Array(4 + body.length);
        new DataView(frame.buffer).setUint32(0, body.length);
        frame.set(body, 4);
        survives([frame]);
      }),
      { numRuns: 30_000 },
    );
  });

  it('survives 30,000 mutated valid frames', () => {
    // A fixed pool of valid frames (seeded), so the runs go into mutating rather than generating.
    const validFrames = fc.sample(messageArb, { numRuns: 300, seed: 42 }).map((m) => encodeFrame(m));
    const mutation = fc.oneof(
      fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
      fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
      fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), value: fc.constant(0) }),
      fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(), value: fc.constant(0) }),
    );
    fc.assert(
      fc.property(fc.constantFrom(...validFrames), fc.array(mutation, { minLength: 1, maxLength: 4 }), fc.array(fc.nat(), { maxLength: 3 }), (frame, mutations, cuts) => {
        let bytes = [...frame];
        for (const m of mutations) {
          const at = m.at % (bytes.length + 1);
          if (m.kind === 'flip' && at < bytes.length) bytes[at] = m.value;
          if (m.kind === 'insert') bytes.splice(at, 0, m.value);
          if (m.kind === 'delete') bytes.splice(at, 1);
          if (m.kind === 'truncate') bytes = bytes.slice(0, at);
        }
        survives(splitAt(new Uint8Array(bytes), cuts));
      }),
      { numRuns: 30_000 },
    );
  });
});
