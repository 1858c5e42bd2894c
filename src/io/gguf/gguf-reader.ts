// Reads the header of a GGUF file (metadata, tensor table, data offset) without reading the weights. The
// parser works on a prefix of the file and asks for more bytes when it runs out (NeedMore).
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import {
  GGML_TYPES,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_SUPPORTED_VERSIONS,
  GgufError,
  GgufValueType,
  alignUp,
  ggmlTensorBytes,
  type GgufScalar,
  type GgufValue,
} from './gguf-format.ts';

// Limits far above any real model, below anything that would make us allocate absurdly.
const MAX_TENSORS = 1_000_000;
const MAX_KV = 1_000_000;
const MAX_DIMS = 4; // GGML_MAX_DIMS
const MAX_HEADER_BYTES = 1024 * 1024 * 1024;
const MAX_STRING_BYTES = 256 * 1024 * 1024;
const MAX_ARRAY_ITEMS = 1 << 30;

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

/** The fixed-size numeric value types: how many bytes each takes and how to read one (little-endian). */
const FIXED_SCALARS: Partial<Record<GgufValueType, readonly [number, (buf: Buffer, at: number) => number | bigint]>> = {
  [GgufValueType.UINT8]: [1, (b, at) => b.readUInt8(at)],
  [GgufValueType.INT8]: [1, (b, at) => b.readInt8(at)],
  [GgufValueType.UINT16]: [2, (b, at) => b.readUInt16LE(at)],
  [GgufValueType.INT16]: [2, (b, at) => b.readInt16LE(at)],
  [GgufValueType.UINT32]: [4, (b, at) => b.readUInt32LE(at)],
  [GgufValueType.INT32]: [4, (b, at) => b.readInt32LE(at)],
  [GgufValueType.FLOAT32]: [4, (b, at) => b.readFloatLE(at)],
  [GgufValueType.UINT64]: [8, (b, at) => b.readBigUInt64LE(at)],
  [GgufValueType.INT64]: [8, (b, at) => b.readBigInt64LE(at)],
  [GgufValueType.FLOAT64]: [8, (b, at) => b.readDoubleLE(at)],
};

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
    if (type === GgufValueType.STRING) return this.string(what);
    if (type === GgufValueType.BOOL) {
      this.need(1, what);
      const b = this.buf.readUInt8(this.pos++);
      if (b > 1) throw new GgufError('bad-value', `${what}: bool byte is ${b}, expected 0 or 1`);
      return b === 1;
    }
    const fixed = FIXED_SCALARS[type];
    if (fixed === undefined) throw new GgufError('bad-value', `${what}: unknown value type ${type as number}`);
    const [bytes, read] = fixed;
    this.need(bytes, what);
    this.pos += bytes;
    return read(this.buf, this.pos - bytes);
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
