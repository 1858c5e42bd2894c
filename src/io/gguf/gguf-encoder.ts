// Encodes a GGUF header (metadata and tensor table) to bytes: the writer's half of the format.
import { GgufError, GgufValueType, type GgufScalar, type GgufValue } from './gguf-format.ts';

/** One row of the tensor table: `offset` is relative to the start of the data section. */
export interface GgufTensorEntry {
  readonly name: string;
  readonly type: number;
  readonly dims: readonly number[];
  readonly offset: number;
}

/** Serialises a byte sequence without knowing its length in advance. */
class Encoder {
  private readonly parts: Buffer[] = [];
  length = 0;
  private push(b: Buffer): void {
    this.parts.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.push(b);
  }
  u64(v: number | bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  string(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.push(bytes);
  }
  scalar(type: GgufValueType, v: GgufScalar, key: string): void {
    const bad = (): never => {
      throw new GgufError('bad-value', `metadata ${key}: value ${String(v)} does not fit type ${GgufValueType[type]}`);
    };
    const num = (): number => (typeof v === 'number' ? v : typeof v === 'bigint' ? Number(v) : bad());
    let b: Buffer;
    switch (type) {
      case GgufValueType.UINT8: b = Buffer.alloc(1); b.writeUInt8(num()); break;
      case GgufValueType.INT8: b = Buffer.alloc(1); b.writeInt8(num()); break;
      case GgufValueType.UINT16: b = Buffer.alloc(2); b.writeUInt16LE(num()); break;
      case GgufValueType.INT16: b = Buffer.alloc(2); b.writeInt16LE(num()); break;
      case GgufValueType.UINT32: b = Buffer.alloc(4); b.writeUInt32LE(num()); break;
      case GgufValueType.INT32: b = Buffer.alloc(4); b.writeInt32LE(num()); break;
      case GgufValueType.FLOAT32: b = Buffer.alloc(4); b.writeFloatLE(num()); break;
      case GgufValueType.FLOAT64: b = Buffer.alloc(8); b.writeDoubleLE(num()); break;
      case GgufValueType.UINT64: b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(typeof v === 'boolean' || typeof v === 'string' ? bad() : v)); break;
      case GgufValueType.INT64: b = Buffer.alloc(8); b.writeBigInt64LE(BigInt(typeof v === 'boolean' || typeof v === 'string' ? bad() : v)); break;
      case GgufValueType.BOOL: b = Buffer.from([typeof v === 'boolean' ? (v ? 1 : 0) : bad()]); break;
      case GgufValueType.STRING: this.string(typeof v === 'string' ? v : bad()); return;
      default: throw new GgufError('bad-value', `metadata ${key}: cannot write value type ${type as number}`);
    }
    this.push(b);
  }
  value(v: GgufValue, key: string): void {
    if (v.type === GgufValueType.ARRAY) {
      this.u32(v.itemType);
      this.u64(v.value.length);
      for (const item of v.value) {
        if (v.itemType === GgufValueType.ARRAY) {
          this.u32(GgufValueType.ARRAY);
          this.value(item as GgufValue, key);
        } else {
          this.scalar(v.itemType, item as GgufScalar, key);
        }
      }
      return;
    }
    this.scalar(v.type, v.value, key);
  }
  concat(): Buffer {
    return Buffer.concat(this.parts, this.length);
  }
}

/**
 * Encodes magic, version 3, metadata and tensor table. The caller pads to the alignment
 * (`general.alignment`, default 32) before the tensor data.
 */
export function encodeGgufHeader(
  metadata: Iterable<readonly [string, GgufValue]>,
  tensors: readonly GgufTensorEntry[],
): Buffer {
  const kv = [...metadata];
  const e = new Encoder();
  e.u32(0x46554747);
  e.u32(3);
  e.u64(tensors.length);
  e.u64(kv.length);
  for (const [key, value] of kv) {
    e.string(key);
    e.u32(value.type);
    e.value(value, key);
  }
  for (const t of tensors) {
    e.string(t.name);
    e.u32(t.dims.length);
    for (const d of t.dims) e.u64(d);
    e.u32(t.type);
    e.u64(t.offset);
  }
  return e.concat();
}
