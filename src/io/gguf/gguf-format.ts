// The GGUF file format's vocabulary, shared by the reader and the writer: magic and versions, metadata value
// types, ggml tensor types and their sizes, alignment, and the one error class for bad files.

/** "GGUF" read as a little-endian u32. */
export const GGUF_MAGIC = 0x46554747;
/** Alignment of the tensor data when `general.alignment` is absent (ggml's GGUF_DEFAULT_ALIGNMENT). */
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** The versions llama.cpp still reads; v1 had 32-bit counts and is long gone. */
export const GGUF_SUPPORTED_VERSIONS: readonly number[] = [2, 3];

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

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}
