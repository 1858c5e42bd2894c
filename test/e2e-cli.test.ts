// The CLI as a user meets it: help, and one clear line (never a stack trace) for a bad token, a taken port
// or missing llama.cpp binaries. Real `bin/mesh-inference.js` processes.
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeE2eModel, type E2eModel } from './e2e-support.ts';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));

function cli(args: readonly string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { env: { ...process.env, ...env }, timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? null) : 0;
      resolve({ code: typeof code === 'number' ? code : null, stdout, stderr });
    });
  });
}

describe('the mesh-inference command line', () => {
  let model: E2eModel;
  let taken: Server;
  let takenPort: number;

  beforeAll(async () => {
    model = await makeE2eModel({ layers: 2, embd: 64, ff: 192, type: 'f16', seed: 3 });
    taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', () => r()));
    takenPort = (taken.address() as { port: number }).port;
  });

  afterAll(async () => {
    await new Promise<void>((r) => taken?.close(() => r()));
    await model?.remove();
  });

  it('--help prints the usage with examples', async () => {
    const r = await cli(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/--model PATH/);
    expect(r.stdout).toMatch(/Examples:/);
  });

  it('a corrupted invite token is one line on stderr, status 2', async () => {
    const r = await cli(['--client', '--join', 'mi1AAAAbroken']);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^mesh-inference: --join: /);
  });

  it('a taken API port is one line naming the port, status 1 (checked before anything starts)', async () => {
    const r = await cli(
      ['--model', model.path, '--port', String(takenPort), '--relay', 'none', '--stun', 'none', '--key-file', join(model.dir, 'k.key'), '--log-level', 'silent'],
      { MESH_INFERENCE_BIND_HOST: '127.0.0.1' },
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`port ${takenPort} is already in use`);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('missing llama.cpp binaries: one line that says how to get them', async () => {
    const r = await cli(
      ['--model', model.path, '--port', '0', '--relay', 'none', '--key-file', join(model.dir, 'k.key'), '--log-level', 'silent'],
      { MESH_LLAMA_BIN_DIR: join(model.dir, 'no-such-dir'), MESH_INFERENCE_BIND_HOST: '127.0.0.1' },
    );
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/MESH_LLAMA_BIN_DIR/);
  });
});
