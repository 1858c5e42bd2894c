// Issue 13, items 3, 4 and 6 against the real thing: `mesh-inference plan` (the real CLI, offline and joined
// to real nodes as an observer), GET /api/plan, and nodes that size plans with the KV cache of real contexts.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_SERVE, kvCacheBytes } from '../src/machines/kv-cache.ts';
import { readModelShape } from '../src/io/gguf/gguf-shape.ts';
import type { PlanPreview } from '../src/machines/plan-explain.ts';
import { e2eBinDir, hostServesPlan, llamaChildren, makeE2eMesh, type E2eMesh, type E2eNode } from './e2e-support.ts';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));

function cli(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, ...args],
      { env: { ...process.env, MESH_LLAMA_BIN_DIR: e2eBinDir(), MESH_INFERENCE_BIND_HOST: '127.0.0.1', MESH_INFERENCE_CTX: '' }, timeout: 60_000 },
      (err, stdout, stderr) => resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr }),
    );
  });
}

const llamaServerPid = (n: E2eNode): number | undefined => llamaChildren(n).find((p) => /llama-server/.test(p.name))?.pid;
const argvOf = (pid: number): string[] => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');

describe('plan preview: mesh-inference plan and GET /api/plan', () => {
  let mesh: E2eMesh;
  let a: E2eNode;
  let b: E2eNode;
  beforeAll(async () => {
    mesh = await makeE2eMesh();
    a = await mesh.start({ name: 'alpha', vram: 0.7 });
    b = await mesh.start({ name: 'beta', vram: 0.6, join: a.token });
    await a.waitStatus(hostServesPlan([b.id, a.id]), 120_000, 'a 2-stage plan');
  }, 180_000);
  afterAll(async () => mesh?.cleanup(), 60_000);

  it('GET /api/plan: the host, which stage gets which layers, each stage part of the KV cache', async () => {
    const preview = (await (await fetch(`${a.api}/api/plan`)).json()) as PlanPreview;
    expect(preview.plan.kind).toBe('ready');
    expect(preview.host?.name).toBe('alpha');
    expect(preview.stages.map((s) => [s.name, s.host])).toEqual([['beta', false], ['alpha', true]]);
    // 8 layers, split in --rpc order by llama.cpp's rule: contiguous, all of them, each stage some.
    const [w, h] = preview.stages.map((s) => s.layers);
    expect(w?.[0]).toBe(0);
    expect(w?.[1]).toBe(h?.[0]);
    expect(h?.[1]).toBe(8);
    expect((w?.[1] ?? 0) > 0 && (h?.[1] ?? 0) > (h?.[0] ?? 0)).toBe(true);
    expect(preview.need?.kvBytes).toBe(mesh.model.kvBytes);
    expect(preview.stages.reduce((n, s) => n + s.kvBytes, 0)).toBe(mesh.model.kvBytes);
    expect(preview.lines.join('\n')).toMatch(/a plan must hold \d+ MiB = 1\.1 x the model \+ 4\.0 MiB KV cache \(ctx 1024 x 1 slot, f16/);
  });

  it('plan --join: an observer that is never a candidate; the host keeps its llama-server (same pid) meanwhile', async () => {
    const pid = llamaServerPid(a);
    const generation = (await a.status()).processes.llamaServer.generation;
    expect(pid).toBeDefined();
    // A candidate that holds the whole model: it would host alone, and alpha and beta would not be needed.
    const run = await cli(['plan', '--model', mesh.model.path, '--join', a.token, '--max-vram', mesh.model.vram(3), '--name', 'gamma', '--relay', 'none', '--stun', 'none', '--ctx-size', '1024']);
    expect(run.code, run.stderr).toBe(0);
    const out = run.stdout;
    expect(out).toMatch(/the mesh now \(2 node\(s\) seen; this preview joined as an observer, never a candidate\)/);
    expect(out).toMatch(/host: alpha .*2 stage\(s\)/);
    expect(out).toMatch(/worker beta \(\w+\): \d+% of the layers: layers 0-\d \(\d\), KV [\d.]+ MiB;/);
    expect(out).toMatch(/host\s+alpha \(\w+\): \d+% of the layers: layers \d-7 \(\d\), KV [\d.]+ MiB, output layer/);
    expect(out).toMatch(/the plan if this machine joined:\n.*\n\s+host: gamma \(this machine\); 1 stage\(s\)/);
    expect(out).toMatch(/left out: alpha \(\w+\): not needed/);
    expect(out).toMatch(/left out: beta \(\w+\): not needed/);
    expect(out).not.toMatch(/left out: gamma \(this machine\)/);
    expect(out).toMatch(/left out: gamma \(plan preview\) \(\w+\): a lite client/);
    // The observer came and went: nothing restarted.
    await new Promise((r) => setTimeout(r, 2_000));
    expect(llamaServerPid(a)).toBe(pid);
    expect((await a.status()).processes.llamaServer.generation).toBe(generation);
    expect(a.lines().join('\n')).not.toMatch(/plan: host gamma/);
  }, 90_000);

  it('plan --json: the same preview as data; a small candidate is left out as not needed', async () => {
    const run = await cli(['plan', '--json', '--model', mesh.model.path, '--join', a.token, '--max-vram', mesh.model.vram(0.2), '--name', 'delta', '--relay', 'none', '--stun', 'none', '--ctx-size', '1024']);
    expect(run.code, run.stderr).toBe(0);
    const report = JSON.parse(run.stdout) as { now: PlanPreview; withCandidate: PlanPreview };
    expect(report.now.host?.name).toBe('alpha');
    expect(report.withCandidate.stages.map((s) => s.name)).toEqual(['beta', 'alpha']);
    expect(report.withCandidate.leftOut.find((l) => l.name === 'delta')?.why).toMatch(/^not needed/);
  }, 90_000);
});

describe('sizing with the KV cache, on real nodes and the real CLI', () => {
  let mesh: E2eMesh;
  beforeAll(async () => void (mesh = await makeE2eMesh()), 60_000);
  afterAll(async () => mesh?.cleanup(), 60_000);

  it('plan without --join: the plan of this machine alone, in the unit that shows the number; the KV cache counts', async () => {
    const m = mesh.model;
    const fits = await cli(['plan', '--model', m.path, '--max-vram', String(Math.ceil(m.bytes * 1.1) + 8 * 1024 ** 2), '--name', 'solo']);
    expect(fits.code, fits.stderr).toBe(0);
    // ctx 4096 (the default) x 1 slot x f16 of 8 layers x (128 + 128) x 2 bytes = 16 MiB.
    expect(fits.stdout).toMatch(/KV cache f16 \(16 MiB\)/);
    expect(fits.stdout).toMatch(/the mesh waits: need \d+ MiB of VRAM for .* \(1\.1 x \d+ MiB \+ 16 MiB KV cache: ctx 4096 x 1 slot, f16\), the mesh has \d+ MiB/);
    const small = await cli(['plan', '--model', m.path, '--max-vram', String(Math.ceil(m.bytes * 1.1) + 8 * 1024 ** 2), '--ctx-size', '1024', '--name', 'solo']);
    expect(small.stdout).toMatch(/host: solo \(this machine\); 1 stage\(s\)/);
    expect(small.stdout).toMatch(/layers 0-7 \(8\), KV 4\.0 MiB, output layer/);
    expect(small.stdout).not.toMatch(/0\.0 GB|GB\b/);
    const bad = await cli(['plan', '--model', m.path, '--cache-type', 'q8_0']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--cache-type q8_0: a quantized KV cache needs --flash-attn on/);
  }, 60_000);

  it('a node whose memory holds 1.1 x the model but not its KV cache waits, and says so', async () => {
    const m = mesh.model;
    const kv4096 = kvCacheBytes(await readModelShape(m.path), DEFAULT_SERVE);
    const node = await mesh.start({ name: 'short', extraArgs: ['--ctx-size', '4096', '--max-vram', String(Math.ceil(m.bytes * 1.1) + Math.floor(kv4096 / 2))] });
    const s = await node.waitStatus((x) => x.plan?.kind === 'waiting', 30_000, 'a waiting plan');
    expect(s.plan?.kind === 'waiting' && s.plan.reason).toMatch(/\+ 16 MiB KV cache: ctx 4096 x 1 slot, f16\), the mesh has \d+ MiB/);
    expect(llamaChildren(node).filter((p) => /llama-server/.test(p.name))).toEqual([]);
  }, 60_000);

  it('--ctx-size, --parallel, --flash-attn and --cache-type reach llama-server (-c is ctx x slots)', async () => {
    const node = await mesh.start({ name: 'tuned', vram: 2, extraArgs: ['--ctx-size', '512', '--parallel', '2', '--flash-attn', 'on', '--cache-type', 'q8_0'] });
    await node.waitStatus(hostServesPlan([node.id]), 90_000, 'a solo plan');
    const argv = argvOf(llamaServerPid(node) as number);
    const flag = (f: string) => argv[argv.indexOf(f) + 1];
    expect([flag('-c'), flag('-np'), flag('-fa'), flag('-ctk'), flag('-ctv')]).toEqual(['1024', '2', 'on', 'q8_0', 'q8_0']);
    const preview = (await (await fetch(`${node.api}/api/plan`)).json()) as PlanPreview;
    // q8_0: 34 bytes per 32 elements; 8 layers x 256 elements x 1024 cells.
    expect(preview.need?.kvBytes).toBe(Math.ceil((8 * 256 * 1024 * 34) / 32));
    expect(preview.need?.kv).toMatchObject({ ctxSize: 512, parallel: 2, cacheType: 'q8_0', flashAttn: 'on' });
  }, 120_000);
});
