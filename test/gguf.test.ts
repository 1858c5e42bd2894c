// GGUF reader and generator without llama.cpp: round trips, determinism, encodings, and typed errors
// for files that are not GGUF, truncated, of another version, or corrupt.
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GgmlType, GgufError, GgufValueType, type GgufValue } from '../src/io/gguf/gguf-format.ts';
import { readModelIdentity } from '../src/io/gguf/gguf-identity.ts';
import { parseGgufHeader, readGgufHeader, type GgufHeader } from '../src/io/gguf/gguf-reader.ts';
import { encodeGgufHeader } from '../src/io/gguf/gguf-encoder.ts';
import { f32ToF16Bits } from '../src/io/gguf/gguf-weights.ts';
import { DEFAULT_VOCAB_PATH, generateLlamaGguf, planLlamaModel, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'gguf-test-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const small = (over: Partial<LlamaModelSpec> = {}): LlamaModelSpec => ({
  layers: 2,
  embd: 64,
  ff: 128,
  type: 'f16',
  seed: 7,
  ...over,
});

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

/** Reads `count` floats of a tensor back from disk, decoding its ggml type. */
async function readTensorValues(path: string, h: GgufHeader, name: string, count: number): Promise<Float32Array> {
  const t = h.tensors.find((x) => x.name === name);
  if (!t) throw new Error(`no tensor ${name}`);
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(Math.min(t.bytes, count * 4 + 64));
    await fh.read(buf, 0, buf.length, t.absoluteOffset);
    const out = new Float32Array(count);
    if (t.type === GgmlType.F32) for (let i = 0; i < count; i++) out[i] = buf.readFloatLE(i * 4);
    else if (t.type === GgmlType.F16) for (let i = 0; i < count; i++) out[i] = f16ToF32(buf.readUInt16LE(i * 2));
    else if (t.type === GgmlType.Q8_0) {
      for (let i = 0; i < count; i++) {
        const block = Math.floor(i / 32);
        out[i] = f16ToF32(buf.readUInt16LE(block * 34)) * buf.readInt8(block * 34 + 2 + (i % 32));
      }
    } else throw new Error(`type ${t.typeName}`);
    return out;
  } finally {
    await fh.close();
  }
}

function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

function stdOf(v: Float32Array): number {
  let s = 0, s2 = 0;
  for (const x of v) {
    s += x;
    s2 += x * x;
  }
  const m = s / v.length;
  return Math.sqrt(s2 / v.length - m * m);
}

describe('generator -> reader round trip', () => {
  for (const type of ['f32', 'f16', 'q8_0'] as const) {
    it(`reads back a ${type} model as written`, async () => {
      const spec = small({ type, heads: 4, kvHeads: 2, contextLength: 1024 });
      const path = join(dir, `rt-${type}.gguf`);
      const written = await generateLlamaGguf(path, spec);
      const h = await readGgufHeader(path);
      expect(h).toEqual(written);
      const plan = await planLlamaModel(spec);

      expect(h.version).toBe(3);
      expect(h.architecture).toBe('llama');
      expect(h.layerCount).toBe(2);
      expect(h.alignment).toBe(32);
      expect(h.fileBytes).toBe(plan.fileBytes);
      expect(h.dataOffset % 32).toBe(0);
      expect(h.dataOffset).toBeGreaterThanOrEqual(h.headerBytes);
      expect(h.tensors).toHaveLength(2 + 9 * 2 + 1);
      for (const t of h.tensors) {
        expect(t.offset % 32).toBe(0);
        expect(t.absoluteOffset).toBe(h.dataOffset + t.offset);
      }
      expect(h.tensorBytes).toBe(h.tensors.reduce((a, t) => a + t.bytes, 0));

      const byName = new Map(h.tensors.map((t) => [t.name, t]));
      const matType = { f32: GgmlType.F32, f16: GgmlType.F16, q8_0: GgmlType.Q8_0 }[type];
      const q = byName.get('blk.1.attn_q.weight')!;
      expect(q.type).toBe(matType);
      expect(q.dims).toEqual([64, 64]);
      expect(byName.get('blk.0.attn_k.weight')!.dims).toEqual([64, 32]); // 2 kv heads of 16
      expect(byName.get('blk.0.ffn_down.weight')!.dims).toEqual([128, 64]);
      expect(byName.get('output.weight')!.dims).toEqual([64, 32000]);
      expect(byName.get('blk.0.attn_norm.weight')!.type).toBe(GgmlType.F32);
      const bytesPerRow = { f32: 64 * 4, f16: 64 * 2, q8_0: (64 / 32) * 34 }[type];
      expect(byName.get('token_embd.weight')!.bytes).toBe(bytesPerRow * 32000);

      const meta = (k: string) => h.metadata.get(k)?.value;
      expect(meta('llama.embedding_length')).toBe(64);
      expect(meta('llama.attention.head_count')).toBe(4);
      expect(meta('llama.attention.head_count_kv')).toBe(2);
      expect(meta('llama.context_length')).toBe(1024);
      expect(meta('llama.feed_forward_length')).toBe(128);
      expect(meta('llama.rope.dimension_count')).toBe(16);
    });
  }

  it('copies every tokenizer.* value from the vocab file verbatim, types included', async () => {
    const path = join(dir, 'tok.gguf');
    const h = await generateLlamaGguf(path, small());
    const vocab = await readGgufHeader(DEFAULT_VOCAB_PATH);
    const tok = (m: ReadonlyMap<string, GgufValue>) => [...m].filter(([k]) => k.startsWith('tokenizer.'));
    expect(tok(vocab.metadata).length).toBeGreaterThan(5);
    expect(tok(h.metadata)).toEqual(tok(vocab.metadata));
  });

  it('writes normal weights of the requested or fan-in-scaled std, F32 ones for norms, zero output rows for special tokens', async () => {
    for (const type of ['f32', 'f16', 'q8_0'] as const) {
      const path = join(dir, `val-${type}.gguf`);
      const h = await generateLlamaGguf(path, small({ type, std: 0.08 }));
      const w = await readTensorValues(path, h, 'blk.0.ffn_up.weight', 64 * 128);
      expect(Math.abs(stdOf(w) - 0.08)).toBeLessThan(0.08 * 0.05);
      expect(new Set(w).size).toBeGreaterThan(100);
      const norm = await readTensorValues(path, h, 'blk.1.ffn_norm.weight', 64);
      expect([...norm].every((x) => x === 1)).toBe(true);
      // Rows 0..258 of the llama-spm vocab are <unk>, <s>, </s> and the 256 byte tokens; 259 is normal text.
      const out = await readTensorValues(path, h, 'output.weight', 64 * 260);
      expect(out.subarray(0, 64 * 259).every((x) => x === 0)).toBe(true);
      expect(out.subarray(64 * 259).some((x) => x !== 0)).toBe(true);
    }
    // Without a fixed std, each matrix gets gain / sqrt(fan_in), fan_in being ne0.
    const scaledPath = join(dir, 'scaled.gguf');
    const hs = await generateLlamaGguf(scaledPath, small({ type: 'f32', gain: 1.6 }));
    const up = await readTensorValues(scaledPath, hs, 'blk.0.ffn_up.weight', 64 * 128);
    const down = await readTensorValues(scaledPath, hs, 'blk.0.ffn_down.weight', 128 * 64);
    expect(Math.abs(stdOf(up) - 1.6 / 8)).toBeLessThan(0.2 * 0.05);
    expect(Math.abs(stdOf(down) - 1.6 / Math.sqrt(128))).toBeLessThan(0.1414 * 0.05);
  });

  it('is deterministic by seed', async () => {
    const a = join(dir, 'seed-a.gguf');
    const b = join(dir, 'seed-b.gguf');
    const c = join(dir, 'seed-c.gguf');
    await generateLlamaGguf(a, small({ seed: 42, name: 'same' }));
    await generateLlamaGguf(b, small({ seed: 42, name: 'same' }));
    await generateLlamaGguf(c, small({ seed: 43, name: 'same' }));
    expect(await sha256(a)).toBe(await sha256(b));
    expect(await sha256(a)).not.toBe(await sha256(c));
    // Same header (names, shapes, metadata): the header's fingerprint cannot tell the weights apart, the
    // model identity (which samples every tensor's bytes) can; the same file gives the same identity.
    expect((await readGgufHeader(a)).fingerprint).toBe((await readGgufHeader(c)).fingerprint);
    expect((await readModelIdentity(a)).fingerprint).toBe((await readModelIdentity(b)).fingerprint);
    expect((await readModelIdentity(a)).fingerprint).not.toBe((await readModelIdentity(c)).fingerprint);
  });

  it('gives different fingerprints to different shapes and a ModelIdentity from the header', async () => {
    const a = join(dir, 'id-a.gguf');
    const b = join(dir, 'id-b.gguf');
    await generateLlamaGguf(a, small({ name: 'tiny-a' }));
    await generateLlamaGguf(b, small({ layers: 3, name: 'tiny-a' }));
    const ia = await readModelIdentity(a);
    const ib = await readModelIdentity(b);
    expect(ia.name).toBe('tiny-a');
    expect(ia.fingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect(ia.fingerprint).not.toBe(ib.fingerprint);
    expect(ia.bytes).toBe((await readFile(a)).length);
  });

  it('refuses impossible shapes with a clear error', async () => {
    await expect(planLlamaModel(small({ type: 'q8_0', embd: 48, heads: 3 }))).rejects.toThrow(/multiples of 32/);
    await expect(planLlamaModel(small({ heads: 5 }))).rejects.toThrow(/not a multiple of heads/);
    await expect(planLlamaModel(small({ heads: 4, kvHeads: 3 }))).rejects.toThrow(/not a multiple of kvHeads/);
    await expect(planLlamaModel(small({ layers: 0 }))).rejects.toThrow(GgufError);
    await expect(planLlamaModel(small({ vocabPath: join(dir, 'missing.gguf') }))).rejects.toMatchObject({ code: 'io' });
  });
});

describe('f32ToF16Bits', () => {
  it('matches IEEE binary16 on known values', () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(0.1)).toBe(0x2e66);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);
    expect(f32ToF16Bits(70000)).toBe(0x7c00);
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001);
    expect(f32ToF16Bits(1e-9)).toBe(0);
    expect(f32ToF16Bits(-0)).toBe(0x8000);
    expect(f32ToF16Bits(Infinity)).toBe(0x7c00);
    expect(f32ToF16Bits(NaN) & 0x7c00).toBe(0x7c00);
  });

  it('round-trips every finite half exactly', () => {
    const wrong: number[] = [];
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) !== 0x7c00 && f32ToF16Bits(f16ToF32(h)) !== h) wrong.push(h);
    }
    expect(wrong).toEqual([]);
  });
});

/** A small valid GGUF built in memory: a few typed values, an array, two tensors, and their data. */
function tinyGguf(): Buffer {
  const meta: [string, GgufValue][] = [
    ['general.architecture', { type: GgufValueType.STRING, value: 'llama' }],
    ['llama.block_count', { type: GgufValueType.UINT32, value: 1 }],
    ['x.i64', { type: GgufValueType.INT64, value: -5n }],
    ['x.bool', { type: GgufValueType.BOOL, value: true }],
    ['x.arr', { type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value: [1, -2, 3] }],
  ];
  const tensors = [
    { name: 'a', type: GgmlType.F32, dims: [4, 2], offset: 0 },
    { name: 'b', type: GgmlType.Q8_0, dims: [32], offset: 32 },
  ];
  const header = encodeGgufHeader(meta, tensors);
  const dataOffset = Math.ceil(header.length / 32) * 32;
  return Buffer.concat([header, Buffer.alloc(dataOffset - header.length), Buffer.alloc(32 + 34, 1)]);
}

describe('reader errors', () => {
  const writeTmp = async (name: string, data: Buffer) => {
    const p = join(dir, name);
    await writeFile(p, data);
    return p;
  };

  it('parses the in-memory sample', () => {
    const h = parseGgufHeader(tinyGguf());
    expect(h.layerCount).toBe(1);
    expect(h.metadata.get('x.i64')).toEqual({ type: GgufValueType.INT64, value: -5n });
    expect(h.metadata.get('x.arr')).toEqual({ type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value: [1, -2, 3] });
    expect(h.tensors.map((t) => [t.name, t.typeName, t.bytes])).toEqual([['a', 'F32', 32], ['b', 'Q8_0', 34]]);
  });

  it('says "not a GGUF file" for other files, naming the path', async () => {
    const p = await writeTmp('zip.gguf', Buffer.from('PK\x03\x04 this is a zip, not a model'));
    await expect(readGgufHeader(p)).rejects.toMatchObject({ name: 'GgufError', code: 'not-gguf' });
    await expect(readGgufHeader(p)).rejects.toThrow(`${p}: not a GGUF file`);
    const empty = await writeTmp('empty.gguf', Buffer.alloc(0));
    await expect(readGgufHeader(empty)).rejects.toMatchObject({ code: 'not-gguf' });
  });

  it('says "truncated" for a file cut inside the header or inside the tensor data', async () => {
    const full = tinyGguf();
    const inHeader = await writeTmp('cut-header.gguf', full.subarray(0, 40));
    await expect(readGgufHeader(inHeader)).rejects.toMatchObject({ code: 'truncated' });
    const inData = await writeTmp('cut-data.gguf', full.subarray(0, full.length - 1));
    await expect(readGgufHeader(inData)).rejects.toThrow(/truncated: tensor b ends at byte/);
  });

  it('says "truncated" for every cut of a real generated model header', async () => {
    const path = join(dir, 'cut-real.gguf');
    const h = await generateLlamaGguf(path, small({ layers: 1 }));
    const head = (await readFile(path)).subarray(0, h.dataOffset + 64);
    for (const cut of [5, 24, 100, 5000, 300_000, h.headerBytes - 1, h.dataOffset + 10]) {
      const p = await writeTmp(`cut-${cut}.gguf`, head.subarray(0, cut));
      await expect(readGgufHeader(p), `cut at ${cut}`).rejects.toMatchObject({ code: 'truncated' });
    }
  });

  it('refuses other versions, and names a big-endian file as such', async () => {
    const v1 = Buffer.from(tinyGguf());
    v1.writeUInt32LE(1, 4);
    expect(() => parseGgufHeader(v1)).toThrow(/GGUF version 1 is not supported/);
    const be = Buffer.from(tinyGguf());
    be.writeUInt32BE(3, 4);
    expect(() => parseGgufHeader(be)).toThrow(/big-endian/);
  });

  it('refuses absurd counts before allocating for them', () => {
    const many = Buffer.from(tinyGguf());
    many.writeBigUInt64LE(1n << 40n, 8); // tensor count
    expect(() => parseGgufHeader(many)).toThrow(expect.objectContaining({ code: 'absurd' }));
    const hugeString = Buffer.from(tinyGguf());
    hugeString.writeBigUInt64LE(1n << 50n, 24); // length of the first key
    expect(() => parseGgufHeader(hugeString)).toThrow(expect.objectContaining({ code: 'absurd' }));
  });

  it('never throws anything but GgufError on cut or corrupted headers (fuzz)', () => {
    const base = tinyGguf();
    fc.assert(
      fc.property(
        fc.nat({ max: base.length }),
        fc.array(fc.tuple(fc.nat({ max: base.length - 1 }), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        (cut, flips) => {
          const b = Buffer.from(base);
          for (const [at, v] of flips) b[at] = v;
          try {
            parseGgufHeader(b.subarray(0, cut));
          } catch (e) {
            if (!(e instanceof GgufError)) throw e;
          }
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('reads only the header of a huge file (a sparse 4 GiB tensor)', async () => {
    const header = encodeGgufHeader(
      [['general.architecture', { type: GgufValueType.STRING, value: 'llama' }]],
      [{ name: 'huge', type: GgmlType.F32, dims: [1024, 1024, 1024], offset: 0 }],
    );
    const dataOffset = Math.ceil(header.length / 32) * 32;
    const p = join(dir, 'sparse.gguf');
    await writeFile(p, header);
    const fh = await open(p, 'r+');
    await fh.truncate(dataOffset + 4 * 1024 ** 3); // a hole: no disk, and reading it all would take long
    await fh.close();
    const before = process.memoryUsage().arrayBuffers;
    const h = await readGgufHeader(p);
    expect(h.fileBytes).toBe(dataOffset + 4 * 1024 ** 3);
    expect(h.tensors[0]).toMatchObject({ name: 'huge', bytes: 4 * 1024 ** 3, absoluteOffset: dataOffset });
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * 1024 * 1024);
  });

  it('reports a missing file as an io error', async () => {
    await expect(readGgufHeader(join(dir, 'nope.gguf'))).rejects.toMatchObject({ code: 'io' });
  });
});

describe('make-model CLI', () => {
  const run = promisify(execFile);
  // node --import tsx starts faster than npx tsx on a busy machine.
  const cli = ['--import', 'tsx', 'bench/tools/make-model.ts'];

  it('writes a model the reader accepts', async () => {
    const out = join(dir, 'cli.gguf');
    const { stdout } = await run(process.execPath, [...cli, '--out', out, '--layers', '2', '--embd', '64', '--ff', '128', '--type', 'q8_0', '--seed', '3']);
    expect(stdout).toMatch(/wrote .*cli\.gguf/);
    const h = await readGgufHeader(out);
    expect(h.layerCount).toBe(2);
    expect(h.tensors.find((t) => t.name === 'output.weight')!.typeName).toBe('Q8_0');
  });

  it('rejects bad flags with usage and exit status 2, bad shapes with a one-line error', async () => {
    await expect(run(process.execPath, [...cli, '--out', join(dir, 'x.gguf'), '--type', 'q4'])).rejects.toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--type must be f32, f16 or q8_0/),
    });
    await expect(run(process.execPath, [...cli, '--out', join(dir, 'x.gguf'), '--embd', '40', '--type', 'q8_0'])).rejects.toMatchObject({
      code: 1,
      stderr: expect.stringMatching(/^make-model: .*multiples of 32/),
    });
  });
});
