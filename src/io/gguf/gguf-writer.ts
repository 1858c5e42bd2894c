// Writes random-weight llama models with a real tokenizer as GGUF files, deterministic by seed and streamed
// to disk, for tests, benchmarks and the demo.
import { existsSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { buildSourceDir } from '../llama/llama-binaries.ts';
import { encodeGgufHeader, type GgufTensorEntry } from './gguf-encoder.ts';
import {
  GGML_TYPES,
  GGUF_DEFAULT_ALIGNMENT,
  GgmlType,
  GgufError,
  GgufValueType,
  alignUp,
  ggmlTensorBytes,
  type GgufValue,
} from './gguf-format.ts';
import { readGgufHeader, type GgufHeader } from './gguf-reader.ts';
import { encodeValues, normalSource, tensorSeed } from './gguf-weights.ts';

export type WeightType = 'f32' | 'f16' | 'q8_0';
const WEIGHT_TYPES: Record<WeightType, { ggml: number; fileType: number }> = {
  f32: { ggml: GgmlType.F32, fileType: 0 }, // LLAMA_FTYPE_ALL_F32
  f16: { ggml: GgmlType.F16, fileType: 1 }, // LLAMA_FTYPE_MOSTLY_F16
  q8_0: { ggml: GgmlType.Q8_0, fileType: 7 }, // LLAMA_FTYPE_MOSTLY_Q8_0
};

/**
 * The vocab-only GGUF of the pinned llama.cpp source that native/build.sh checked out (`npm install`
 * does): a real 32000-token SentencePiece tokenizer. The patched tree's, else the stock tree's.
 */
export const DEFAULT_VOCAB_PATH = ((): string => {
  const [mesh, stock] = (['mesh', 'stock'] as const).map((v) => join(buildSourceDir(v), 'models', 'ggml-vocab-llama-spm.gguf'));
  return existsSync(mesh!) || !existsSync(stock!) ? mesh! : stock!;
})();

export interface LlamaModelSpec {
  /** Transformer blocks. */
  readonly layers: number;
  /** Width of the residual stream (n_embd). */
  readonly embd: number;
  /** Hidden width of the feed-forward block. */
  readonly ff: number;
  /** Attention heads; default: heads of 64 dims from embd 128 up, of 16 below, else one head. */
  readonly heads?: number;
  /** Key/value heads (GQA); default: heads. */
  readonly kvHeads?: number;
  /** Trained context length announced in the metadata; default 2048. */
  readonly contextLength?: number;
  /** Type of the weight matrices (token embedding, attention, ffn, output); norms are always F32. */
  readonly type: WeightType;
  readonly seed: number;
  /**
   * Standard deviation of every weight matrix. Default: `gain / sqrt(fan_in)` per matrix, which keeps
   * activations near 1 at any width (0.2 at width 64, 0.058 at 768).
   */
  readonly std?: number;
  /**
   * The gain of the default std; default 1.6. Greedy output of a random model falls into a short loop
   * of a few tokens when the weights are too small (std 0.05 at width 64 gave 5 distinct tokens in 48);
   * from about 1.6 / sqrt(fan_in) on, the 48 tokens are nearly all distinct.
   */
  readonly gain?: number;
  /** `general.name`; default derived from the shape and seed. */
  readonly name?: string;
  /** A GGUF whose `tokenizer.*` metadata is copied; default DEFAULT_VOCAB_PATH. */
  readonly vocabPath?: string;
}

/** What the generator will write, computed before writing a byte. */
export interface LlamaModelPlan {
  readonly metadata: ReadonlyMap<string, GgufValue>;
  readonly tensors: readonly GgufTensorEntry[];
  readonly header: Buffer;
  readonly dataOffset: number;
  /** Size of the file that will be written. */
  readonly fileBytes: number;
  readonly vocabSize: number;
  /** Token ids whose output.weight rows are zeroed (byte, control, unknown and unused tokens). */
  readonly silencedTokens: ReadonlySet<number>;
}

// llama.cpp token types (gguf-py TokenType).
const TOKEN_TYPE_NORMAL = 1;
const TOKEN_TYPE_USER_DEFINED = 4;

function positiveInt(v: number | undefined, what: string): number {
  if (v === undefined || !Number.isInteger(v) || v <= 0) {
    throw new GgufError('bad-value', `${what} must be a positive integer, got ${String(v)}`);
  }
  return v;
}

/** Heads of 64 dims for wide models, of 16 for tiny ones, one head when neither divides. */
function defaultHeads(embd: number): number {
  if (embd >= 128 && embd % 64 === 0) return embd / 64;
  if (embd % 16 === 0) return embd / 16;
  return 1;
}

/** Validates the spec and lays out metadata, tensors and offsets. Reads only the vocab's header. */
export async function planLlamaModel(spec: LlamaModelSpec): Promise<LlamaModelPlan> {
  const layers = positiveInt(spec.layers, 'layers');
  const embd = positiveInt(spec.embd, 'embd');
  const ff = positiveInt(spec.ff, 'ff');
  const heads = positiveInt(spec.heads ?? defaultHeads(embd), 'heads');
  const kvHeads = positiveInt(spec.kvHeads ?? heads, 'kvHeads');
  const contextLength = positiveInt(spec.contextLength ?? 2048, 'contextLength');
  const wt = WEIGHT_TYPES[spec.type];
  if (!wt) throw new GgufError('bad-value', `type must be one of ${Object.keys(WEIGHT_TYPES).join(', ')}, got ${String(spec.type)}`);
  if (!Number.isInteger(spec.seed) || spec.seed < 0 || spec.seed > 0xffffffff) {
    throw new GgufError('bad-value', `seed must be an integer in 0..2^32-1, got ${String(spec.seed)}`);
  }
  if (spec.std !== undefined && !(spec.std > 0 && spec.std < 10)) {
    throw new GgufError('bad-value', `std must be in (0, 10), got ${spec.std}`);
  }
  if (spec.gain !== undefined && !(spec.gain > 0 && spec.gain < 100)) {
    throw new GgufError('bad-value', `gain must be in (0, 100), got ${spec.gain}`);
  }
  if (embd % heads !== 0) throw new GgufError('bad-value', `embd ${embd} is not a multiple of heads ${heads}`);
  if (heads % kvHeads !== 0) throw new GgufError('bad-value', `heads ${heads} is not a multiple of kvHeads ${kvHeads}`);
  const headDim = embd / heads;
  if (headDim % 2 !== 0) throw new GgufError('bad-value', `head dimension ${headDim} must be even (RoPE rotates pairs)`);
  const block = GGML_TYPES[wt.ggml]!.blockSize;
  if (embd % block !== 0 || ff % block !== 0) {
    throw new GgufError('bad-value', `${spec.type} needs embd and ff to be multiples of ${block}, got ${embd} and ${ff}`);
  }

  const vocab = await readGgufHeader(spec.vocabPath ?? DEFAULT_VOCAB_PATH);
  const tokens = vocab.metadata.get('tokenizer.ggml.tokens');
  if (!tokens || tokens.type !== GgufValueType.ARRAY || tokens.itemType !== GgufValueType.STRING) {
    throw new GgufError('bad-value', `vocab file has no tokenizer.ggml.tokens string array`, spec.vocabPath ?? DEFAULT_VOCAB_PATH);
  }
  const vocabSize = tokens.value.length;
  const silencedTokens = new Set<number>();
  const tokenTypes = vocab.metadata.get('tokenizer.ggml.token_type');
  if (tokenTypes?.type === GgufValueType.ARRAY) {
    tokenTypes.value.forEach((t, id) => {
      if (t !== TOKEN_TYPE_NORMAL && t !== TOKEN_TYPE_USER_DEFINED) silencedTokens.add(id);
    });
  }

  const u32 = (value: number): GgufValue => ({ type: GgufValueType.UINT32, value });
  const f32 = (value: number): GgufValue => ({ type: GgufValueType.FLOAT32, value });
  const str = (value: string): GgufValue => ({ type: GgufValueType.STRING, value });
  const name = spec.name ?? `random-llama-${layers}x${embd}-ff${ff}-${spec.type}-seed${spec.seed}`;
  const metadata = new Map<string, GgufValue>([
    ['general.architecture', str('llama')],
    ['general.name', str(name)],
    ['general.file_type', u32(wt.fileType)],
    ['llama.context_length', u32(contextLength)],
    ['llama.embedding_length', u32(embd)],
    ['llama.block_count', u32(layers)],
    ['llama.feed_forward_length', u32(ff)],
    ['llama.attention.head_count', u32(heads)],
    ['llama.attention.head_count_kv', u32(kvHeads)],
    ['llama.attention.layer_norm_rms_epsilon', f32(1e-5)],
    ['llama.rope.dimension_count', u32(headDim)],
    ['llama.rope.freq_base', f32(10000)],
    ['llama.vocab_size', u32(vocabSize)],
  ]);
  for (const [k, v] of vocab.metadata) if (k.startsWith('tokenizer.')) metadata.set(k, v);

  const kvDim = headDim * kvHeads;
  const shapes: { name: string; type: number; dims: number[] }[] = [
    { name: 'token_embd.weight', type: wt.ggml, dims: [embd, vocabSize] },
  ];
  for (let i = 0; i < layers; i++) {
    shapes.push(
      { name: `blk.${i}.attn_norm.weight`, type: GgmlType.F32, dims: [embd] },
      { name: `blk.${i}.attn_q.weight`, type: wt.ggml, dims: [embd, embd] },
      { name: `blk.${i}.attn_k.weight`, type: wt.ggml, dims: [embd, kvDim] },
      { name: `blk.${i}.attn_v.weight`, type: wt.ggml, dims: [embd, kvDim] },
      { name: `blk.${i}.attn_output.weight`, type: wt.ggml, dims: [embd, embd] },
      { name: `blk.${i}.ffn_norm.weight`, type: GgmlType.F32, dims: [embd] },
      { name: `blk.${i}.ffn_gate.weight`, type: wt.ggml, dims: [embd, ff] },
      { name: `blk.${i}.ffn_up.weight`, type: wt.ggml, dims: [embd, ff] },
      { name: `blk.${i}.ffn_down.weight`, type: wt.ggml, dims: [ff, embd] },
    );
  }
  shapes.push(
    { name: 'output_norm.weight', type: GgmlType.F32, dims: [embd] },
    { name: 'output.weight', type: wt.ggml, dims: [embd, vocabSize] },
  );

  let offset = 0;
  const tensors: GgufTensorEntry[] = shapes.map((s) => {
    const entry = { ...s, offset };
    offset = alignUp(offset + ggmlTensorBytes(s.type, s.dims), GGUF_DEFAULT_ALIGNMENT);
    return entry;
  });
  const header = encodeGgufHeader(metadata, tensors);
  const dataOffset = alignUp(header.length, GGUF_DEFAULT_ALIGNMENT);
  const last = tensors[tensors.length - 1]!;
  const fileBytes = dataOffset + last.offset + ggmlTensorBytes(last.type, last.dims);
  return { metadata, tensors, header, dataOffset, fileBytes, vocabSize, silencedTokens };
}

/** See LlamaModelSpec.gain. */
export const DEFAULT_GAIN = 1.6;

export interface GenerateProgress {
  readonly bytesWritten: number;
  readonly totalBytes: number;
  readonly tensor: string;
}

/**
 * Writes a random-weight llama GGUF to `out` and returns its header as the reader sees it.
 * Memory stays at about one chunk (~1 MiB of weights) whatever the model's size; the file appears
 * under its name only once complete.
 */
export async function generateLlamaGguf(
  out: string,
  spec: LlamaModelSpec,
  onProgress?: (p: GenerateProgress) => void,
): Promise<GgufHeader> {
  const plan = await planLlamaModel(spec);
  const gain = spec.gain ?? DEFAULT_GAIN;
  const tmp = `${out}.partial-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    let pos = 0;
    const write = async (b: Buffer): Promise<void> => {
      await fh.write(b, 0, b.length, pos);
      pos += b.length;
    };
    await write(plan.header);
    await write(Buffer.alloc(plan.dataOffset - plan.header.length));
    for (const t of plan.tensors) {
      await write(Buffer.alloc(plan.dataOffset + t.offset - pos)); // alignment padding
      const ne0 = t.dims[0]!;
      const rng = normalSource(tensorSeed(spec.seed, t.name), spec.std ?? gain / Math.sqrt(ne0));
      const rows = t.dims.slice(1).reduce((a, b) => a * b, 1);
      const isNorm = t.dims.length === 1;
      const rowsPerChunk = Math.max(1, Math.floor((256 * 1024) / ne0));
      const values = new Float32Array(ne0 * rowsPerChunk);
      for (let r0 = 0; r0 < rows; r0 += rowsPerChunk) {
        const n = Math.min(rowsPerChunk, rows - r0);
        const chunk = values.subarray(0, n * ne0);
        if (isNorm) chunk.fill(1);
        else for (let i = 0; i < chunk.length; i++) chunk[i] = rng();
        if (t.name === 'output.weight') {
          // Random logits for byte/control tokens make llama-server emit invalid UTF-8 (HTTP 500).
          for (let r = 0; r < n; r++) if (plan.silencedTokens.has(r0 + r)) chunk.fill(0, r * ne0, (r + 1) * ne0);
        }
        await write(encodeValues(t.type, chunk, ne0));
        onProgress?.({ bytesWritten: pos, totalBytes: plan.fileBytes, tensor: t.name });
      }
    }
    if (pos !== plan.fileBytes) throw new Error(`internal: wrote ${pos} bytes, planned ${plan.fileBytes}`);
    await fh.close();
    await rename(tmp, out);
  } catch (e) {
    await fh.close().catch(() => {});
    await rm(tmp, { force: true });
    throw e;
  }
  return readGgufHeader(out);
}
