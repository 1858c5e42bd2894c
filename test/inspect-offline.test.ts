// Issue 13, item 5: `--inspect` with no URL on a machine that cannot reach stately.ai says what failed (not
// "[object Object]") and how to use a local WebSocket inspector instead; online, the link is printed.
// `mesh-inference inspector` is that local relay: a node started with --inspect ws://... reaches it.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { freeLoopbackPort } from '../src/io/llama/rpc-server-process.ts';
import { makeE2eMesh, type E2eMesh } from './e2e-support.ts';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));

describe('--inspect offline and the local inspector relay', () => {
  let mesh: E2eMesh;
  beforeAll(async () => void (mesh = await makeE2eMesh()), 60_000);
  afterAll(async () => mesh?.cleanup(), 60_000);

  it('--inspect with no URL: online the link, offline what failed and the local alternative', async () => {
    const node = await mesh.start({ name: 'insp', vram: 2, extraArgs: ['--inspect'] });
    const deadline = Date.now() + 30_000;
    const found = () => node.lines().find((l) => /inspector connection failed|link to your live inspect session/.test(l));
    while (found() === undefined && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    const line = found();
    expect(line, node.lines().join('\n')).toBeDefined();
    if (/link to your live inspect session/.test(line as string)) {
      // Online: the link follows.
      expect(node.lines().join('\n')).toMatch(/https:\/\/stately\.ai\/registry\/inspect\/[0-9a-f-]+/);
    } else {
      const text = node.lines().join('\n');
      expect(text).not.toMatch(/\[object Object\]/);
      expect(line).toMatch(/cannot reach stately\.ai's inspector service \([^)]*\w[^)]*\)/);
      expect(line).toMatch(/mesh-inference inspector.*--inspect ws:\/\/127\.0\.0\.1:8080/);
      // Once, not once per retry.
      expect(node.lines().filter((l) => /inspector connection failed/.test(l))).toHaveLength(1);
    }
  }, 60_000);

  it('mesh-inference inspector relays what a node started with --inspect ws://... sends', async () => {
    const port = await freeLoopbackPort();
    const relay = spawn(process.execPath, [BIN, 'inspector', '--port', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      let out = '';
      relay.stdout.on('data', (d) => (out += String(d)));
      while (!out.includes('relaying')) await new Promise((r) => setTimeout(r, 100));
      expect(out).toContain(`--inspect ws://127.0.0.1:${port}`);
      // A browser's side of the relay: whatever the nodes send arrives here.
      const seen: string[] = [];
      const browser = new WebSocket(`ws://127.0.0.1:${port}`);
      browser.on('message', (d) => seen.push(String(d)));
      await new Promise((r) => browser.once('open', r));
      await mesh.start({ name: 'relayed', vram: 2, extraArgs: ['--inspect', `ws://127.0.0.1:${port}`] });
      const deadline = Date.now() + 30_000;
      while (!seen.some((m) => m.includes('"@xstate.snapshot"')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      expect(seen.some((m) => m.includes('"@xstate.snapshot"'))).toBe(true);
      browser.close();
    } finally {
      relay.kill('SIGTERM');
    }
  }, 60_000);
});
