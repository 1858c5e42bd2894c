// Random weights for generated models: seeded normal samples, encoded as ggml tensor types (f32, f16, q8_0)
// the way ggml's reference code rounds them.
import { GgmlType } from './gguf-format.ts';

/** A 32-bit seed per tensor (FNV-1a of seed and name), so each tensor's values do not depend on the others. */
export function tensorSeed(seed: number, name: string): number {
  let h = 0x811c9dc5;
  const s = `${seed}:${name}`;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** Normal(0, std) samples from sfc32 through Box-Muller: fast, seedable, and the same on every run. */
export function normalSource(seed: number, std: number): () => number {
  let a = 0x9e3779b9, b = 0x243f6a88, c = 0xb7e15162, d = seed >>> 0;
  const next = (): number => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
  for (let i = 0; i < 12; i++) next(); // sfc32 needs a few rounds to mix a small seed
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const s = spare;
      spare = null;
      return s;
    }
    const u1 = 1 - next(); // (0, 1]: log stays finite
    const u2 = next();
    const r = Math.sqrt(-2 * Math.log(u1)) * std;
    spare = r * Math.sin(2 * Math.PI * u2);
    return r * Math.cos(2 * Math.PI * u2);
  };
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** IEEE binary16 bits of a float, rounded to nearest even (as ggml's FP32_TO_FP16 does on CPU). */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++; // may carry into the exponent: still correct
  return sign | half;
}

/** Encodes whole rows of `ne0` values as the given ggml type. */
export function encodeValues(type: number, v: Float32Array, ne0: number): Buffer {
  switch (type) {
    case GgmlType.F32:
      return Buffer.from(v.buffer, v.byteOffset, v.byteLength); // little-endian hosts only
    case GgmlType.F16: {
      const h = new Uint16Array(v.length); // little-endian hosts only, as above
      for (let i = 0; i < v.length; i++) h[i] = f32ToF16Bits(v[i]!);
      return Buffer.from(h.buffer, h.byteOffset, h.byteLength);
    }
    case GgmlType.Q8_0: {
      // block_q8_0: f16 scale d, then 32 int8; x ~= d * q (ggml quantize_row_q8_0_ref).
      if (ne0 % 32 !== 0) throw new Error(`internal: Q8_0 row of ${ne0}`);
      const blocks = v.length / 32;
      const b = Buffer.allocUnsafe(blocks * 34);
      for (let k = 0; k < blocks; k++) {
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(v[k * 32 + j]!));
        const d = amax / 127;
        const id = d ? 1 / d : 0;
        b.writeUInt16LE(f32ToF16Bits(d), k * 34);
        for (let j = 0; j < 32; j++) {
          const x = v[k * 32 + j]! * id;
          b.writeInt8(Math.sign(x) * Math.round(Math.abs(x)), k * 34 + 2 + j); // roundf: halves away from zero
        }
      }
      return b;
    }
    default:
      throw new Error(`internal: no encoder for ggml type ${type}`);
  }
}
