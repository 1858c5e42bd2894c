// The deflate codec of tunnel streams: any split of the stream decodes to the same bytes, compressible
// chunks shrink and incompressible ones go stored, and hostile frames fail cleanly.
import { randomBytes } from 'node:crypto';
import { deflateRawSync } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FrameDecoder, FrameEncoder, MAX_FRAME_BYTES, TunnelProtocolError } from '../src/io/transport/tunnel-codec.ts';

function header(type: number, len: number, original: number): Buffer {
  const h = Buffer.alloc(9);
  h[0] = type;
  h.writeUInt32LE(len, 1);
  h.writeUInt32LE(original, 5);
  return h;
}

describe('tunnel frame codec', () => {
  it('decodes any split of an encoded stream back to the original bytes', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.uint8Array({ minLength: 0, maxLength: 3000 }),
            // Compressible: long runs, as in RPC tensor headers and masks.
            fc.tuple(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 1, max: 5000 })).map(([v, n]) => new Uint8Array(n).fill(v)),
          ),
          { maxLength: 20 },
        ),
        fc.array(fc.integer({ min: 1, max: 4000 }), { minLength: 1, maxLength: 10 }),
        (chunks, cuts) => {
          const enc = new FrameEncoder();
          const wire = Buffer.concat(chunks.filter((c) => c.length > 0).map((c) => enc.encode(c)));
          const dec = new FrameDecoder();
          const out: Buffer[] = [];
          let o = 0;
          let i = 0;
          while (o < wire.length) {
            const n = cuts[i++ % cuts.length]!;
            out.push(...dec.push(wire.subarray(o, o + n)));
            o += n;
          }
          expect(dec.midFrame).toBe(false);
          expect(Buffer.concat(out).equals(Buffer.concat(chunks))).toBe(true);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('deflates compressible chunks and stores random ones', () => {
    const enc = new FrameEncoder();
    const zeros = new Uint8Array(16_384);
    expect(enc.encode(zeros).length).toBeLessThan(200);
    const noise = randomBytes(16_384);
    expect(enc.encode(noise).length).toBe(noise.length + 9);
    // Small chunks are never worth deflating.
    expect(enc.encode(new Uint8Array(100)).length).toBe(109);
  });

  it('backs off after an incompressible chunk, and tries again later', () => {
    const enc = new FrameEncoder();
    enc.encode(randomBytes(4096));
    const zeros = new Uint8Array(4096);
    const sizes: number[] = [];
    for (let i = 0; i < 20; i++) sizes.push(enc.encode(zeros).length);
    // Stored during the back-off, deflated after it.
    expect(sizes.slice(0, 16).every((n) => n === 4096 + 9)).toBe(true);
    expect(sizes.at(-1)!).toBeLessThan(200);
  });

  it('rejects unknown frame types, oversize frames, bad deflate data and bombs', () => {
    expect(() => new FrameDecoder().push(header(7, 0, 0))).toThrow(TunnelProtocolError);
    expect(() => new FrameDecoder().push(header(0, MAX_FRAME_BYTES + 1, 0))).toThrow(/over the/);
    expect(() => new FrameDecoder().push(Buffer.concat([header(1, 4, 10), Buffer.from([1, 2, 3, 4])]))).toThrow(
      /bad deflated frame/,
    );
    // 1 MiB of zeros deflated to ~1 KB, claiming to be 100 bytes: inflating stops at the claim.
    const bomb = deflateRawSync(new Uint8Array(1024 * 1024));
    expect(() => new FrameDecoder().push(Buffer.concat([header(1, bomb.length, 100), bomb]))).toThrow(TunnelProtocolError);
    expect(() => new FrameDecoder().push(Buffer.concat([header(0, 3, 4), Buffer.from([1, 2, 3])]))).toThrow(/wrong length/);
  });

  it('passes a stored frame on as it arrives, without waiting for its end', () => {
    const dec = new FrameDecoder();
    const payload = Buffer.from(randomBytes(1000));
    const wire = Buffer.concat([header(0, 1000, 1000), payload]);
    expect(Buffer.concat(dec.push(wire.subarray(0, 509)))).toEqual(payload.subarray(0, 500));
    expect(dec.midFrame).toBe(true);
    expect(Buffer.concat(dec.push(wire.subarray(509)))).toEqual(payload.subarray(500));
    expect(dec.midFrame).toBe(false);
  });

  it('knows when the stream ended inside a frame', () => {
    const dec = new FrameDecoder();
    dec.push(header(0, 10, 10).subarray(0, 5));
    expect(dec.midFrame).toBe(true);
  });
});
