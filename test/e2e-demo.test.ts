// `npm start` as the README promises it: no arguments -> a 3-node demo mesh on loopback with a generated
// random-weight model, split across all three nodes, answering the OpenAI API, saying plainly that the
// weights are random; Ctrl-C (SIGINT) stops it all, leaving no process behind.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnManaged, type ManagedProcess } from '../src/io/llama/processes.ts';
import { descendants, e2eBinDir, isAlive } from './e2e-support.ts';
import type { NodeStatus } from '../src/node.ts';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));

describe('npm start: the demo mesh', () => {
  let demo: ManagedProcess | null = null;
  let cache: string | null = null;

  afterAll(async () => {
    await demo?.stop(15_000);
    if (cache) await rm(cache, { recursive: true, force: true });
  });

  it('serves a 3-way split on loopback, says the weights are random, and stops on Ctrl-C', async () => {
    cache = await mkdtemp(join(tmpdir(), 'mesh-demo-cache-'));
    const lines: string[] = [];
    demo = spawnManaged({
      name: 'demo',
      file: process.execPath,
      args: [BIN],
      // Port 0: the first node picks a free port and the demo prints it.
      env: { XDG_CACHE_HOME: cache, MESH_INFERENCE_DEMO_PORT: '0', MESH_LLAMA_BIN_DIR: e2eBinDir() },
      tailLines: 500,
    });
    demo.onLine((l) => lines.push(l));
    const deadline = Date.now() + 180_000;
    while (!lines.some((l) => l.includes('Ctrl-C stops'))) {
      if (demo.exitInfo() !== null) throw new Error(`the demo exited:\n${lines.join('\n')}`);
      if (Date.now() > deadline) throw new Error(`the demo did not get to serving in 3 minutes:\n${lines.join('\n')}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const text = lines.join('\n');
    expect(text).toMatch(/RANDOM weights/);
    expect(text).toMatch(/3 nodes share the layers/);
    const api = /API: (http:\/\/\S+)/.exec(text)?.[1];
    expect(api).toBeDefined();

    // It tells where the console is, and the console is there.
    expect(text).toContain(`Console: ${api}/ `);
    const page = await fetch(`${api}/`);
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('/console/console.js');
    const status = (await (await fetch(`${api}/api/status`)).json()) as NodeStatus;
    expect(status.plan?.kind).toBe('ready');
    if (status.plan?.kind === 'ready') expect(status.plan.stages).toHaveLength(3);
    const client = new OpenAI({ baseURL: `${api}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    const res = await client.chat.completions.create({ model: 'demo', messages: [{ role: 'user', content: 'hi' }], max_tokens: 8 });
    expect(res.choices[0]?.message.content?.length).toBeGreaterThan(0);

    const tree = descendants(demo.pid).filter((p) => /llama-server|ggml-rpc-serv|node/.test(p.name));
    // Three nodes, three rpc-servers, one llama-server.
    expect(tree.filter((p) => p.name === 'ggml-rpc-server')).toHaveLength(3);
    expect(tree.filter((p) => p.name === 'llama-server')).toHaveLength(1);
    demo.kill('SIGINT');
    const exit = await Promise.race([demo.exited, new Promise<null>((r) => setTimeout(() => r(null), 30_000))]);
    expect(exit?.code).toBe(0);
    await new Promise((r) => setTimeout(r, 300));
    expect(tree.filter((p) => isAlive(p.pid))).toEqual([]);
  }, 240_000);
});
