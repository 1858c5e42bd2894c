// The model's shape as the KV cache sees it, from the GGUF header: layers, and K / V elements per token
// (n_head_kv x key_length, n_head_kv x value_length, summed over the layers; head_count_kv may be one number
// or one per layer). Defaults as llama.cpp's: head_count_kv = head_count, key/value length = n_embd / head_count.
import type { ModelShape } from '../../machines/kv-cache.ts';
import { GgufError } from './gguf-format.ts';
import { metaNumber, readGgufHeader, type GgufHeader } from './gguf-reader.ts';

export function ggufModelShape(h: GgufHeader, path = 'model'): ModelShape {
  const arch = h.architecture;
  const need = (key: string): number => {
    const v = metaNumber(h, `${arch}.${key}`);
    if (v === undefined || !Number.isFinite(v) || v <= 0) throw new GgufError('bad-value', `no ${arch}.${key} in the header: cannot size the KV cache`, path);
    return v;
  };
  if (arch === null) throw new GgufError('bad-value', 'no general.architecture in the header: cannot size the KV cache', path);
  const layers = need('block_count');
  const embd = need('embedding_length');
  const heads = perLayer(h, `${arch}.attention.head_count`, layers) ?? Array.from({ length: layers }, () => need('attention.head_count'));
  const kvHeads = perLayer(h, `${arch}.attention.head_count_kv`, layers) ?? heads;
  const keyLength = metaNumber(h, `${arch}.attention.key_length`);
  const valueLength = metaNumber(h, `${arch}.attention.value_length`);
  let kPerToken = 0;
  let vPerToken = 0;
  for (let l = 0; l < layers; l++) {
    const nHead = heads[l] ?? 0;
    const nKv = kvHeads[l] ?? 0;
    const headDim = nHead > 0 ? embd / nHead : 0;
    kPerToken += nKv * (keyLength ?? headDim);
    vPerToken += nKv * (valueLength ?? headDim);
  }
  return { layers, kPerToken: Math.round(kPerToken), vPerToken: Math.round(vPerToken) };
}

/** A number or an array of numbers (one per layer) under `key`, as one number per layer; undefined when absent. */
function perLayer(h: GgufHeader, key: string, layers: number): number[] | undefined {
  const v = h.metadata.get(key)?.value;
  if (typeof v === 'number' || typeof v === 'bigint') return Array.from({ length: layers }, () => Number(v));
  if (Array.isArray(v)) return Array.from({ length: layers }, (_, i) => Number(v[i] ?? 0));
  return undefined;
}

export async function readModelShape(path: string): Promise<ModelShape> {
  return ggufModelShape(await readGgufHeader(path), path);
}
