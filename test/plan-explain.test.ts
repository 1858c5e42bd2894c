// The plan preview's pure parts: llama.cpp's layer split, the KV cache's bytes, the GGUF's shape, sizes for
// people, and why each node is left out (against the product's elect).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateLlamaGguf } from '../src/io/gguf/gguf-writer.ts';
import { readModelShape } from '../src/io/gguf/gguf-shape.ts';
import { emptyView, mergeAnnouncements } from '../src/machines/gossip.ts';
import { kvCacheBytes, layerRanges, type KvSizing } from '../src/machines/kv-cache.ts';
import { asEndpointId, type Announcement, type ModelIdentity } from '../src/machines/mesh-types.ts';
import { previewPlan, withCandidate } from '../src/machines/plan-explain.ts';
import { formatSize } from '../src/machines/units.ts';

const MIB = 1024 ** 2;
const MODEL: ModelIdentity = { name: 'm', bytes: 100 * MIB, fingerprint: 'fp' };
const KV: KvSizing = { ctxSize: 4096, parallel: 1, cacheType: 'f16', flashAttn: 'off', layers: 8, bytes: 20 * MIB };
const ann = (id: string, vramMib: number, links: string[], extra: Partial<Announcement> = {}): Announcement => ({
  id: asEndpointId(id), epoch: 1, seq: 1, name: id, role: 'auto', vramBytes: vramMib * MIB, model: MODEL, version: 3, serving: false, addrs: [],
  connectedTo: links.map(asEndpointId).sort(), kv: KV, ...extra,
});
const view = (self: string, all: Announcement[]) => mergeAnnouncements(emptyView(all.find((a) => a.id === self) as Announcement), all).view;

describe('sizes for people', () => {
  it('prints the unit that shows the number', () => {
    expect([formatSize(45 * MIB), formatSize(9.5 * MIB), formatSize(512 * 1024), formatSize(1.5 * 1024 ** 3), formatSize(17)]).toEqual(['45 MiB', '9.5 MiB', '512 KiB', '1.5 GiB', '17 B']);
  });
});

describe('the KV cache and the layer split', () => {
  it('reads the shape from a GGUF (GQA: kv heads, not heads) and sizes the cache per cache type', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'mesh-shape-'));
    try {
      await generateLlamaGguf(join(dir, 'm.gguf'), { layers: 4, embd: 256, ff: 512, heads: 4, kvHeads: 2, type: 'f16', seed: 3 });
      const shape = await readModelShape(join(dir, 'm.gguf'));
      // head dim 64, 2 kv heads: 128 K and 128 V elements per layer per token.
      expect(shape).toEqual({ layers: 4, kPerToken: 4 * 128, vPerToken: 4 * 128 });
      expect(kvCacheBytes(shape, { ctxSize: 1000, parallel: 3, cacheType: 'f16' })).toBe(1024 * 3000 * 2);
      expect(kvCacheBytes(shape, { ctxSize: 1024, parallel: 1, cacheType: 'q8_0' })).toBe((1024 * 1024 * 34) / 32);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("splits layers by llama.cpp's rule: contiguous, in --rpc order, the output layer counted on the last device", () => {
    expect(layerRanges([0.5, 0.5], 8)).toEqual([[0, 5], [5, 8]]);
    expect(layerRanges([1], 8)).toEqual([[0, 8]]);
    expect(layerRanges([0.05, 0.95], 8)).toEqual([[0, 1], [1, 8]]);
    expect(layerRanges([0, 1], 8)).toEqual([[0, 0], [0, 8]]);
  });
});

describe('previewPlan explains elect', () => {
  it('names the host, the layers and why the others are left out', () => {
    const nodes = [
      ann('a', 100, ['b', 'c', 'd', 'e']), ann('b', 60, ['a', 'c']), ann('c', 10, ['a', 'b']),
      ann('d', 500, ['a'], { model: { ...MODEL, name: 'other', fingerprint: 'fp2' } }), ann('e', 0, ['a'], { role: 'client', model: null }),
    ];
    const p = previewPlan(view('a', nodes));
    expect(p.plan.kind).toBe('ready');
    expect(p.host?.name).toBe('a');
    expect(p.need).toMatchObject({ kvBytes: 20 * MIB, bytes: Math.ceil((100 * MIB * 11) / 10) + 20 * MIB });
    expect(p.stages.map((s) => [s.name, s.layers])).toEqual([['b', [0, 4]], ['a', [4, 8]]]);
    expect(Object.fromEntries(p.leftOut.map((l) => [l.name, l.why.split(':')[0]]))).toEqual({ c: 'not needed', d: 'holds a different model (other, 100 MiB)', e: 'a lite client (no model)' });
  });

  it('says why the mesh waits, and what a candidate joining would change', () => {
    const nodes = [ann('a', 60, ['b']), ann('b', 40, ['a'], { role: 'client', model: null })];
    const p = previewPlan(view('b', nodes));
    expect(p.plan.kind).toBe('waiting');
    expect(p.lines.join('\n')).toMatch(/need 130 MiB of VRAM for m \(1\.1 x 100 MiB \+ 20 MiB KV cache: ctx 4096 x 1 slot, f16\), the mesh has 60 MiB/);
    // The observer b previews a candidate of 80 MiB on its machine: it connects where b connects.
    const cand = ann('z', 80, []);
    const w = previewPlan(withCandidate(view('b', nodes), cand));
    expect(w.plan.kind === 'ready' && w.plan.stages.map((s) => s.id)).toEqual(['a', 'z']);
    expect(w.leftOut).toEqual([]);
  });
});
