// Reads the header of a GGUF file (metadata, tensor table, data offset) without reading the weights,
// and fingerprints it so that two nodes can tell whether they hold the same model.
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { basename } from 'node:path';
import type { ModelIdentity } from '../../machines/mesh-types.ts';

/** "GGUF" read as a little-endian u32. */
export const GGUF_MAGIC = 0x46554747;
/** Alignment of the tensor data when `general.alignment` is absent (ggml's GGUF_DEFAULT_ALIGNMENT). */
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** The versions llama.cpp still reads; v1 had 32-bit counts and is long gone. */
export const GGUF_SUPPORTED_VERSIONS: readonly number[] = [2, 3];

// Limits far above any real model, below anything that would make us allocate absurdly.
const MAX_TENSORS = 1_000_000;
const MAX_KV = 1_000_000;
const MAX_DIMS = 4; // GGML_MAX_DIMS
const MAX_HEADER_BYTES = 1024 * 1024 * 1024;
const MAX_STRING_BYTES = 256 * 1024 * 1024;
const MAX_ARRAY_ITEMS = 1 << 30;

export type GgufErrorCode =
  | 'not-gguf'
  | 'truncated'
  | 'unsupported-version'
  | 'absurd'
  | 'bad-value'
  | 'unknown-tensor-type'
  | 'io';

/** Every problem with a GGUF file, with a code to branch on and a message for people. */
export class GgufError extends Error {
  override readonly name = 'GgufError';
  constructor(
    readonly code: GgufErrorCode,
    message: string,
    readonly path?: string,
  ) {
    super(path ? `${path}: ${message}` : message);
  }
}

/** GGUF metadata value types, numbered as in the file format (gguf-py's GGUFValueType). */
export enum GgufValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

export type GgufScalar = number | bigint | boolean | string;

/**
 * A typed metadata value. The type is kept so that a writer can copy values verbatim
 * (a u32 stays a u32). 64-bit integers are bigints; arrays of arrays hold nested GgufValues.
 */
export type GgufValue =
  | { readonly type: Exclude<GgufValueType, GgufValueType.ARRAY>; readonly value: GgufScalar }
  | {
      readonly type: GgufValueType.ARRAY;
      readonly itemType: GgufValueType;
      readonly value: readonly GgufScalar[] | readonly GgufValue[];
    };

/** Block geometry of a ggml tensor type: `blockSize` elements take `typeSize` bytes. */
export interface GgmlTypeInfo {
  readonly name: string;
  readonly blockSize: number;
  readonly typeSize: number;
}

const QK_K = 256;
/** ggml tensor types by number (ggml.h / gguf-py GGML_QUANT_SIZES of the pinned release). */
export const GGML_TYPES: Readonly<Record<number, GgmlTypeInfo>> = {
  0: { name: 'F32', blockSize: 1, typeSize: 4 },
  1: { name: 'F16', blockSize: 1, typeSize: 2 },
  2: { name: 'Q4_0', blockSize: 32, typeSize: 2 + 16 },
  3: { name: 'Q4_1', blockSize: 32, typeSize: 2 + 2 + 16 },
  6: { name: 'Q5_0', blockSize: 32, typeSize: 2 + 4 + 16 },
  7: { name: 'Q5_1', blockSize: 32, typeSize: 2 + 2 + 4 + 16 },
  8: { name: 'Q8_0', blockSize: 32, typeSize: 2 + 32 },
  9: { name: 'Q8_1', blockSize: 32, typeSize: 4 + 4 + 32 },
  10: { name: 'Q2_K', blockSize: QK_K, typeSize: 2 + 2 + QK_K / 16 + QK_K / 4 },
  11: { name: 'Q3_K', blockSize: QK_K, typeSize: 2 + QK_K / 4 + QK_K / 8 + 12 },
  12: { name: 'Q4_K', blockSize: QK_K, typeSize: 2 + 2 + QK_K / 2 + 12 },
  13: { name: 'Q5_K', blockSize: QK_K, typeSize: 2 + 2 + QK_K / 2 + QK_K / 8 + 12 },
  14: { name: 'Q6_K', blockSize: QK_K, typeSize: 2 + QK_K / 2 + QK_K / 4 + QK_K / 16 },
  15: { name: 'Q8_K', blockSize: QK_K, typeSize: 4 + QK_K + QK_K / 8 },
  16: { name: 'IQ2_XXS', blockSize: QK_K, typeSize: 2 + QK_K / 4 },
  17: { name: 'IQ2_XS', blockSize: QK_K, typeSize: 2 + QK_K / 4 + QK_K / 32 },
  18: { name: 'IQ3_XXS', blockSize: QK_K, typeSize: 2 + QK_K / 4 + QK_K / 8 },
  19: { name: 'IQ1_S', blockSize: QK_K, typeSize: 2 + QK_K / 8 + QK_K / 16 },
  20: { name: 'IQ4_NL', blockSize: 32, typeSize: 2 + 16 },
  21: { name: 'IQ3_S', blockSize: QK_K, typeSize: 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4 },
  22: { name: 'IQ2_S', blockSize: QK_K, typeSize: 2 + QK_K / 4 + QK_K / 16 },
  23: { name: 'IQ4_XS', blockSize: QK_K, typeSize: 2 + 2 + QK_K / 2 + QK_K / 64 },
  24: { name: 'I8', blockSize: 1, typeSize: 1 },
  25: { name: 'I16', blockSize: 1, typeSize: 2 },
  26: { name: 'I32', blockSize: 1, typeSize: 4 },
  27: { name: 'I64', blockSize: 1, typeSize: 8 },
  28: { name: 'F64', blockSize: 1, typeSize: 8 },
  29: { name: 'IQ1_M', blockSize: QK_K, typeSize: QK_K / 8 + QK_K / 16 + QK_K / 32 },
  30: { name: 'BF16', blockSize: 1, typeSize: 2 },
  34: { name: 'TQ1_0', blockSize: QK_K, typeSize: 2 + 4 * 13 },
  35: { name: 'TQ2_0', blockSize: QK_K, typeSize: 2 + 64 },
  39: { name: 'MXFP4', blockSize: 32, typeSize: 1 + 16 },
  40: { name: 'NVFP4', blockSize: 64, typeSize: 4 + 32 },
  41: { name: 'Q1_0', blockSize: 128, typeSize: 2 + 16 },
  42: { name: 'Q2_0', blockSize: 64, typeSize: 2 + 16 },
};

/** The ggml type numbers the generator writes. */
export const GgmlType = { F32: 0, F16: 1, Q8_0: 8 } as const;

/** Bytes a tensor of `type` with these dims takes; throws when the row is not a whole number of blocks. */
export function ggmlTensorBytes(type: number, dims: readonly number[]): number {
  const info = GGML_TYPES[type];
  if (!info) throw new GgufError('unknown-tensor-type', `unknown ggml tensor type ${type}`);
  const ne0 = dims[0] ?? 1;
  if (ne0 % info.blockSize !== 0) {
    throw new GgufError(
      'bad-value',
      `a ${info.name} row must be a multiple of ${info.blockSize} elements, got ${ne0}`,
    );
  }
  let rows = 1;
  for (const d of dims.slice(1)) rows *= d;
  return (ne0 / info.blockSize) * info.typeSize * rows;
}

export interface GgufTensorInfo {
  readonly name: string;
  /** ggml type number (see GGML_TYPES). */
  readonly type: number;
  readonly typeName: string;
  /** ne0 first (the fastest-varying dimension), as stored in the file. */
  readonly dims: readonly number[];
  readonly elements: number;
  /** Offset from the start of the data section, as stored in the file. */
  readonly offset: number;
  /** Offset from the start of the file. */
  readonly absoluteOffset: number;
  readonly bytes: number;
}

export interface GgufHeader {
  readonly version: number;
  readonly metadata: ReadonlyMap<string, GgufValue>;
  /** `general.architecture`, or null when absent. */
  readonly architecture: string | null;
  /** `<arch>.block_count`, or null when absent. */
  readonly layerCount: number | null;
  readonly alignment: number;
  readonly tensors: readonly GgufTensorInfo[];
  /** Bytes of magic, counts, metadata and tensor infos: what the fingerprint hashes. */
  readonly headerBytes: number;
  /** Where the tensor data starts: headerBytes rounded up to the alignment. */
  readonly dataOffset: number;
  /** Sum of the tensors' byte sizes. */
  readonly tensorBytes: number;
  /** Size of the whole file. */
  readonly fileBytes: number;
  /** sha256 hex of the header bytes and the file size: equal for copies of one model. */
  readonly fingerprint: string;
}

/** Thrown inside the parser when the buffer ends early; the file reader then reads more and retries. */
class NeedMore {
  constructor(readonly upTo: number) {}
}

const textDecoder = new TextDecoder('utf-8', { fatal: true });

/** A cursor over the bytes read so far. `end` tells it whether more of the file exists. */
class Cursor {
  pos = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly fileBytes: number,
  ) {}

  private need(n: number, what: string): void {
    const upTo = this.pos + n;
    if (upTo <= this.buf.length) return;
    if (upTo > this.fileBytes) {
      throw new GgufError(
        'truncated',
        `file is truncated: ${what} at byte ${this.pos} needs ${n} bytes, but the file has ${this.fileBytes}`,
      );
    }
    throw new NeedMore(upTo);
  }

  u8(what: string): number {
    this.need(1, what);
    return this.buf.readUInt8(this.pos++);
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }
  /** A u64 that must fit a JS number (counts, sizes, offsets). */
  u64n(what: string): number {
    this.need(8, what);
    const v = this.buf.readBigUInt64LE(this.pos);
    this.pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new GgufError('absurd', `${what} is ${v}, far beyond any real file`);
    }
    return Number(v);
  }
  scalar(type: GgufValueType, what: string): GgufScalar {
    switch (type) {
      case GgufValueType.UINT8:
        this.need(1, what);
        return this.buf.readUInt8(this.pos++);
      case GgufValueType.INT8:
        this.need(1, what);
        return this.buf.readInt8(this.pos++);
      case GgufValueType.UINT16:
        this.need(2, what);
        this.pos += 2;
        return this.buf.readUInt16LE(this.pos - 2);
      case GgufValueType.INT16:
        this.need(2, what);
        this.pos += 2;
        return this.buf.readInt16LE(this.pos - 2);
      case GgufValueType.UINT32:
        this.need(4, what);
        this.pos += 4;
        return this.buf.readUInt32LE(this.pos - 4);
      case GgufValueType.INT32:
        this.need(4, what);
        this.pos += 4;
        return this.buf.readInt32LE(this.pos - 4);
      case GgufValueType.FLOAT32:
        this.need(4, what);
        this.pos += 4;
        return this.buf.readFloatLE(this.pos - 4);
      case GgufValueType.BOOL: {
        this.need(1, what);
        const b = this.buf.readUInt8(this.pos++);
        if (b > 1) throw new GgufError('bad-value', `${what}: bool byte is ${b}, expected 0 or 1`);
        return b === 1;
      }
      case GgufValueType.STRING:
        return this.string(what);
      case GgufValueType.UINT64:
        this.need(8, what);
        this.pos += 8;
        return this.buf.readBigUInt64LE(this.pos - 8);
      case GgufValueType.INT64:
        this.need(8, what);
        this.pos += 8;
        return this.buf.readBigInt64LE(this.pos - 8);
      case GgufValueType.FLOAT64:
        this.need(8, what);
        this.pos += 8;
        return this.buf.readDoubleLE(this.pos - 8);
      default:
        throw new GgufError('bad-value', `${what}: unknown value type ${type as number}`);
    }
  }
  string(what: string): string {
    const len = this.u64n(`${what} (string length)`);
    if (len > MAX_STRING_BYTES) throw new GgufError('absurd', `${what}: string of ${len} bytes is absurd`);
    if (this.pos + len > this.fileBytes) {
      throw new GgufError(
        'truncated',
        `file is truncated (or corrupt): ${what} is a ${len}-byte string at byte ${this.pos}, but the file has ${this.fileBytes}`,
      );
    }
    this.need(len, what);
    let s: string;
    try {
      s = textDecoder.decode(this.buf.subarray(this.pos, this.pos + len));
    } catch {
      throw new GgufError('bad-value', `${what}: string at byte ${this.pos} is not valid UTF-8`);
    }
    this.pos += len;
    return s;
  }
  value(type: number, what: string, depth = 0): GgufValue {
    if (type === GgufValueType.ARRAY) {
      if (depth > 8) throw new GgufError('absurd', `${what}: arrays nested more than 8 deep`);
      const itemType = this.u32(`${what} (array item type)`);
      if (!(itemType in GgufValueType)) {
        throw new GgufError('bad-value', `${what}: unknown array item type ${itemType}`);
      }
      const count = this.u64n(`${what} (array length)`);
      if (count > MAX_ARRAY_ITEMS) throw new GgufError('absurd', `${what}: array of ${count} items is absurd`);
      // Every item takes at least one byte: more items than bytes left means the file ends early.
      if (count > this.fileBytes - this.pos) {
        throw new GgufError(
          'truncated',
          `file is truncated (or corrupt): ${what} is an array of ${count} items at byte ${this.pos}, but the file has ${this.fileBytes} bytes`,
        );
      }
      if (itemType === GgufValueType.ARRAY) {
        const items: GgufValue[] = [];
        for (let i = 0; i < count; i++) items.push(this.value(itemType, `${what}[${i}]`, depth + 1));
        return { type: GgufValueType.ARRAY, itemType, value: items };
      }
      const items: GgufScalar[] = new Array(count);
      for (let i = 0; i < count; i++) items[i] = this.scalar(itemType, what);
      return { type: GgufValueType.ARRAY, itemType, value: items };
    }
    if (!(type in GgufValueType)) throw new GgufError('bad-value', `${what}: unknown value type ${type}`);
    return { type: type as Exclude<GgufValueType, GgufValueType.ARRAY>, value: this.scalar(type, what) };
  }
}

/**
 * Parses a GGUF header from the first bytes of a file. `buf` may hold just a prefix of the file
 * (`fileBytes` long); when it is too short but the file is longer, a NeedMore is thrown
 * internally and `readGgufHeader` retries with more bytes.
 */
function parse(buf: Buffer, fileBytes: number): GgufHeader {
  const c = new Cursor(buf, fileBytes);
  if (fileBytes < 4) throw new GgufError('not-gguf', `not a GGUF file: only ${fileBytes} bytes long`);
  if (buf.length < 4) throw new NeedMore(4);
  const magic = buf.readUInt32LE(0);
  if (magic !== GGUF_MAGIC) {
    const shown = JSON.stringify(buf.subarray(0, 4).toString('latin1'));
    throw new GgufError('not-gguf', `not a GGUF file: it starts with ${shown}, expected "GGUF"`);
  }
  c.pos = 4;
  const version = c.u32('version');
  if (!GGUF_SUPPORTED_VERSIONS.includes(version)) {
    const hint = version >= 0x01000000 ? ' (a big-endian GGUF?)' : '';
    throw new GgufError(
      'unsupported-version',
      `GGUF version ${version}${hint} is not supported; supported: ${GGUF_SUPPORTED_VERSIONS.join(', ')}`,
    );
  }
  const tensorCount = c.u64n('tensor count');
  const kvCount = c.u64n('metadata count');
  if (tensorCount > MAX_TENSORS) throw new GgufError('absurd', `tensor count ${tensorCount} is absurd (limit ${MAX_TENSORS})`);
  if (kvCount > MAX_KV) throw new GgufError('absurd', `metadata count ${kvCount} is absurd (limit ${MAX_KV})`);

  const metadata = new Map<string, GgufValue>();
  for (let i = 0; i < kvCount; i++) {
    const key = c.string(`metadata key #${i}`);
    const type = c.u32(`type of ${key}`);
    if (metadata.has(key)) throw new GgufError('bad-value', `metadata key ${key} appears twice`);
    metadata.set(key, c.value(type, key));
  }

  const alignValue = metadata.get('general.alignment');
  let alignment = GGUF_DEFAULT_ALIGNMENT;
  if (alignValue) {
    const raw = alignValue.value;
    const a = typeof raw === 'bigint' ? Number(raw) : raw;
    if (typeof a !== 'number' || !Number.isInteger(a) || a <= 0 || (a & (a - 1)) !== 0) {
      throw new GgufError('bad-value', `general.alignment must be a power of two, got ${String(a)}`);
    }
    alignment = a;
  }

  const raw: { name: string; type: number; dims: number[]; offset: number }[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = c.string(`tensor #${i} name`);
    const nDims = c.u32(`tensor ${name} dimension count`);
    if (nDims < 1 || nDims > MAX_DIMS) {
      throw new GgufError('absurd', `tensor ${name} has ${nDims} dimensions (ggml allows 1..${MAX_DIMS})`);
    }
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(c.u64n(`tensor ${name} dim ${d}`));
    const type = c.u32(`tensor ${name} type`);
    const offset = c.u64n(`tensor ${name} offset`);
    raw.push({ name, type, dims, offset });
  }
  const headerBytes = c.pos;
  const dataOffset = alignUp(headerBytes, alignment);

  const tensors: GgufTensorInfo[] = [];
  let tensorBytes = 0;
  const names = new Set<string>();
  for (const t of raw) {
    if (names.has(t.name)) throw new GgufError('bad-value', `tensor ${t.name} appears twice`);
    names.add(t.name);
    const info = GGML_TYPES[t.type];
    if (!info) throw new GgufError('unknown-tensor-type', `tensor ${t.name} has unknown ggml type ${t.type}`);
    let elements = 1;
    for (const d of t.dims) {
      elements *= d;
      if (!Number.isSafeInteger(elements)) throw new GgufError('absurd', `tensor ${t.name} has absurd dims ${t.dims.join('x')}`);
    }
    let bytes: number;
    try {
      bytes = ggmlTensorBytes(t.type, t.dims);
    } catch (e) {
      if (e instanceof GgufError) throw new GgufError(e.code, `tensor ${t.name}: ${e.message}`);
      throw e;
    }
    if (t.offset % alignment !== 0) {
      throw new GgufError('bad-value', `tensor ${t.name} offset ${t.offset} is not a multiple of the alignment ${alignment}`);
    }
    const absoluteOffset = dataOffset + t.offset;
    if (absoluteOffset + bytes > fileBytes) {
      throw new GgufError(
        'truncated',
        `file is truncated: tensor ${t.name} ends at byte ${absoluteOffset + bytes}, but the file has ${fileBytes}`,
      );
    }
    tensorBytes += bytes;
    tensors.push({ name: t.name, type: t.type, typeName: info.name, dims: t.dims, elements, offset: t.offset, absoluteOffset, bytes });
  }

  const archValue = metadata.get('general.architecture')?.value;
  const architecture = typeof archValue === 'string' ? archValue : null;
  const blocks = architecture ? metadata.get(`${architecture}.block_count`)?.value : undefined;
  const layerCount = typeof blocks === 'number' ? blocks : typeof blocks === 'bigint' ? Number(blocks) : null;

  const fingerprint = createHash('sha256')
    .update(buf.subarray(0, headerBytes))
    .update(`\0size=${fileBytes}`)
    .digest('hex');

  return {
    version,
    metadata,
    architecture,
    layerCount,
    alignment,
    tensors,
    headerBytes,
    dataOffset,
    tensorBytes,
    fileBytes,
    fingerprint,
  };
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

/**
 * Parses a header from an in-memory prefix of a file of `fileBytes` bytes (defaults to the buffer's
 * length). Throws GgufError 'truncated' when the buffer ends inside the header.
 */
export function parseGgufHeader(buf: Buffer, fileBytes: number = buf.length): GgufHeader {
  try {
    return parse(buf, fileBytes);
  } catch (e) {
    if (e instanceof NeedMore) {
      throw new GgufError('truncated', `header continues past the ${buf.length} bytes given (needs ${e.upTo})`);
    }
    throw e;
  }
}

/**
 * Reads the header of the GGUF file at `path`, reading only as much of the file as the header
 * takes (in growing chunks), never the tensor data.
 */
export async function readGgufHeader(path: string): Promise<GgufHeader> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw new GgufError('io', `cannot open: ${(e as Error).message}`, path);
  }
  try {
    const { size: fileBytes } = await fh.stat();
    let want = Math.min(fileBytes, 1024 * 1024);
    let buf = Buffer.alloc(0);
    for (;;) {
      if (want > buf.length) {
        const next = Buffer.alloc(want);
        buf.copy(next);
        const { bytesRead } = await fh.read(next, buf.length, want - buf.length, buf.length);
        buf = next.subarray(0, buf.length + bytesRead);
      }
      try {
        return parse(buf, fileBytes);
      } catch (e) {
        if (!(e instanceof NeedMore)) throw e;
        // Reparsing from the start is cheap next to the read; doubling keeps the total work linear.
        want = Math.min(fileBytes, Math.max(e.upTo, want * 2));
        if (want > MAX_HEADER_BYTES) throw new GgufError('absurd', `header is larger than ${MAX_HEADER_BYTES} bytes`);
        if (want <= buf.length) throw new GgufError('io', `file shrank while being read`);
      }
    }
  } catch (e) {
    if (e instanceof GgufError && !e.path) throw new GgufError(e.code, e.message, path);
    if (e instanceof GgufError) throw e;
    throw new GgufError('io', `cannot read: ${(e as Error).message}`, path);
  } finally {
    await fh.close();
  }
}

/** A metadata value as a number (u8..u64, i8..i64, f32, f64), or undefined when absent or not numeric. */
export function metaNumber(h: GgufHeader, key: string): number | undefined {
  const v = h.metadata.get(key)?.value;
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  return undefined;
}

/** A metadata value as a string, or undefined when absent or not a string. */
export function metaString(h: GgufHeader, key: string): string | undefined {
  const v = h.metadata.get(key)?.value;
  return typeof v === 'string' ? v : undefined;
}

/** Bytes read from the start and from the end of every tensor for the content fingerprint. */
const SAMPLE_BYTES = 4096;

/**
 * The identity two nodes compare before serving one model together. The header alone cannot tell two
 * models of one shape apart (a fine-tune, another seed), and a worker loads weights from its own file, so
 * the fingerprint also hashes a sample of every tensor's bytes: its first and last 4 KiB. That costs two
 * small reads per tensor, never a pass over the weights.
 */
export async function ggufModelIdentity(path: string, header: GgufHeader): Promise<ModelIdentity> {
  const hash = createHash('sha256').update(header.fingerprint);
  let fh;
  try {
    fh = await open(path, 'r');
    const sample = Buffer.alloc(SAMPLE_BYTES);
    for (const t of header.tensors) {
      const n = Math.min(SAMPLE_BYTES, t.bytes);
      for (const at of new Set([t.absoluteOffset, t.absoluteOffset + t.bytes - n])) {
        const { bytesRead } = await fh.read(sample, 0, n, at);
        if (bytesRead !== n) throw new GgufError('truncated', `file is truncated inside tensor ${t.name}`, path);
        hash.update(sample.subarray(0, n));
      }
    }
  } catch (e) {
    if (e instanceof GgufError) throw e;
    throw new GgufError('io', `cannot read tensor data: ${(e as Error).message}`, path);
  } finally {
    await fh?.close();
  }
  return {
    name: metaString(header, 'general.name') ?? basename(path).replace(/\.gguf$/i, ''),
    bytes: header.fileBytes,
    fingerprint: hash.digest('hex'),
  };
}

/** Reads the header and a sample of the weights, and returns the model's identity. */
export async function readModelIdentity(path: string): Promise<ModelIdentity> {
  return ggufModelIdentity(path, await readGgufHeader(path));
}
