// The KV cache a plan must hold besides the weights, from the model's shape and the host's serving settings.
// Pure. llama-server allocates it on the devices of the layers it belongs to (each stage holds its layers'
// share), so a plan needs 1.1 x the model bytes (weights, compute buffers) plus the whole KV cache.
//
// How the mesh agrees on the settings: the host's llama-server is the one that allocates the cache, so the
// election uses the HOST's settings, which every node announces (`Announcement.kv`, signed like the rest):
// a node started with --ctx-size 32768 sizes the plans it would host for 32768, whatever its workers say.

/** llama.cpp's KV cache types (`-ctk` / `-ctv`) and their size per element, as a fraction num/den. */
export const KV_CACHE_TYPES = {
  f32: [4, 1],
  f16: [2, 1],
  bf16: [2, 1],
  q8_0: [34, 32],
  q4_0: [18, 32],
  q4_1: [20, 32],
  iq4_nl: [18, 32],
  q5_0: [22, 32],
  q5_1: [24, 32],
} as const satisfies Record<string, readonly [number, number]>;
export type KvCacheType = keyof typeof KV_CACHE_TYPES;

export function isKvCacheType(s: string): s is KvCacheType {
  return Object.prototype.hasOwnProperty.call(KV_CACHE_TYPES, s);
}

/** A quantized V cache needs flash attention in llama.cpp. */
export function needsFlashAttention(type: KvCacheType): boolean {
  return type !== 'f32' && type !== 'f16' && type !== 'bf16';
}

export type FlashAttention = 'on' | 'off' | 'auto';

/** How a host runs llama-server: the context of each request, the slots, the cache type, flash attention. */
export interface ServeSettings {
  /** Tokens of context per slot (one request at a time each): llama-server gets -c ctxSize x parallel. */
  readonly ctxSize: number;
  /** Slots (-np): requests served at once. */
  readonly parallel: number;
  readonly cacheType: KvCacheType;
  readonly flashAttn: FlashAttention;
}

export const DEFAULT_SERVE: ServeSettings = { ctxSize: 4096, parallel: 1, cacheType: 'f16', flashAttn: 'off' };

/** The model's shape as far as the KV cache goes (from the GGUF header: src/io/gguf/gguf-shape.ts). */
export interface ModelShape {
  /** Repeating layers (`<arch>.block_count`). */
  readonly layers: number;
  /** K elements per token over all layers: sum of n_embd_k_gqa (n_head_kv x key_length) per layer. */
  readonly kPerToken: number;
  /** V elements per token over all layers: sum of n_embd_v_gqa per layer. */
  readonly vPerToken: number;
}

/** What a node announces about the plans it would host (see the header): its settings and what they cost. */
export interface KvSizing extends ServeSettings {
  /** The model's repeating layers, for showing which stage gets which layers. */
  readonly layers: number;
  /** The KV cache's bytes over all layers for these settings. */
  readonly bytes: number;
}

/** Bytes of the KV cache: (K + V elements per token) x ctx x parallel x bytes per element, rounded up. */
export function kvCacheBytes(shape: ModelShape, settings: Pick<ServeSettings, 'ctxSize' | 'parallel' | 'cacheType'>): number {
  const [num, den] = KV_CACHE_TYPES[settings.cacheType];
  const cells = settings.ctxSize * settings.parallel;
  return Math.ceil(((shape.kPerToken + shape.vPerToken) * cells * num) / den);
}

export function kvSizing(shape: ModelShape, settings: ServeSettings): KvSizing {
  return { ...settings, layers: shape.layers, bytes: kvCacheBytes(shape, settings) };
}

/** "ctx 4096 x 1 slot, f16" */
export function describeServe(s: Pick<ServeSettings, 'ctxSize' | 'parallel' | 'cacheType'>): string {
  return `ctx ${s.ctxSize} x ${s.parallel} slot${s.parallel === 1 ? '' : 's'}, ${s.cacheType}`;
}

/**
 * Which repeating layers each device gets for a --tensor-split, by llama.cpp's rule (llama-model.cpp,
 * load_tensors: with every layer offloaded, layer il goes to the first device whose cumulative share
 * exceeds il / (n_layer + 1); the output layer, il = n_layer, to the last one). [from, to) per stage.
 */
export function layerRanges(shares: readonly number[], layers: number): Array<readonly [number, number]> {
  const total = shares.reduce((s, x) => s + x, 0);
  const cumulative: number[] = [];
  let acc = 0;
  for (const s of shares) {
    acc += s;
    cumulative.push(total > 0 ? acc / total : 0);
  }
  const deviceOf = (il: number): number => {
    const x = il / (layers + 1);
    const i = cumulative.findIndex((c) => c > x); // std::upper_bound
    return i === -1 ? shares.length - 1 : i;
  };
  const ranges: Array<[number, number]> = shares.map(() => [0, 0]);
  let from = 0;
  for (let d = 0; d < shares.length; d++) {
    let to = from;
    while (to < layers && deviceOf(to) === d) to++;
    ranges[d] = [from, to];
    from = to;
  }
  return ranges;
}
