// Rotating the mesh secret and removing a member (issue 10, item 4), with real node processes on loopback and
// the real CLI: A founds a mesh, B and C join with A's mi1 token; `mesh-inference rotate --remove c`, signed
// with A's key file, gives the mesh a new secret: A and B save it (key epoch 1, C removed), C is closed out
// and forgotten, C restarted with its same command line is refused by id; the old mi1 token no longer
// admits a newcomer, an invite made after the rotation does; a request signed by another key file is refused.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeE2eMesh, type E2eMesh, type E2eNode, waitLinked } from './e2e-support.ts';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));
const run = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function cli(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args], { timeout: 30_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

async function untilLine(n: E2eNode, re: RegExp, ms: number): Promise<string> {
  const end = Date.now() + ms;
  for (;;) {
    const hit = n.lines().find((l) => re.test(l));
    if (hit !== undefined) return hit;
    if (Date.now() > end) throw new Error(`${n.name}: no line matching ${re} within ${ms} ms:\n${n.lines().slice(-20).join('\n')}`);
    await sleep(100);
  }
}

describe('e2e: rotating the mesh secret and removing a member', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let dir: string;
  beforeAll(async () => {
    mesh = await makeE2eMesh();
    dir = mesh.model.dir;
  });
  afterAll(async () => {
    await mesh?.cleanup();
  });

  const meshFile = (name: string) =>
    JSON.parse(readFileSync(join(dir, `${name}.key.mesh.json`), 'utf8')) as { secret: string; keyEpoch: number; removed: string[]; retired: string[]; peers: { id: string }[] };

  it('rotate --remove: members take the new secret, the removed one is closed out for good, old tokens stop admitting', async () => {
    const a = await mesh.start({ name: 'a', vram: 2 });
    const b = await mesh.start({ name: 'b', model: null, join: a.token });
    const c = await mesh.start({ name: 'c', model: null, join: a.token });
    await waitLinked(a, b.id);
    await waitLinked(a, c.id);
    await waitLinked(b, c.id);
    const port = new URL(a.api).port;
    const before = meshFile('a').secret;

    // Signed by another node's key file: refused, nothing changes.
    const wrongKey = await cli(['rotate', '--key-file', join(dir, 'b.key'), '--port', port, '--remove', 'c']);
    expect(wrongKey.code, wrongKey.stdout).toBe(1);
    expect(wrongKey.stderr).toMatch(/HTTP 403.*not signed by this node's key/);
    // An unknown name: refused before anything changes.
    const unknown = await cli(['rotate', '--key-file', join(dir, 'a.key'), '--port', port, '--remove', 'nobody']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/no member named/);
    expect(meshFile('a').secret).toBe(before);

    const done = await cli(['rotate', '--key-file', join(dir, 'a.key'), '--port', port, '--remove', 'c']);
    expect(done.code, done.stderr).toBe(0);
    expect(done.stdout).toMatch(/secret rotated to key epoch 1; sent to 1 member\(s\): b/);
    expect(done.stdout).toMatch(/removed: c \(/);

    // A and B hold the new secret (A's file written before the answer), C is gone from both views.
    const fileA = meshFile('a');
    expect(fileA.keyEpoch).toBe(1);
    expect(fileA.secret).not.toBe(before);
    expect(fileA.removed).toEqual([c.id]);
    await b.waitStatus((s) => s.node.keyEpoch === 1 && !s.view.some((v) => v.id === c.id), 30_000, 'b on key epoch 1 without c');
    await a.waitStatus((s) => !s.view.some((v) => v.id === c.id) && s.node.removedMembers === 1, 30_000, 'a without c');
    await sleep(2_500); // b's mesh file is debounced 2 s
    expect(meshFile('b').secret).toBe(fileA.secret);
    expect(meshFile('b').peers.map((p) => p.id)).not.toContain(c.id);
    await untilLine(c, /removed from the mesh by/, 10_000);
    expect(meshFile('c').keyEpoch).toBe(0); // the removed member never learns the new secret

    // C restarted with the same command line: refused by id.
    await c.stop();
    const c2 = await mesh.start({ name: 'c', model: null, join: a.token });
    await untilLine(a, /refusing peer: node .* was removed from this mesh/, 30_000);
    await sleep(1_000);
    expect((await a.status()).view.some((v) => v.id === c2.id)).toBe(false);
    await c2.stop();

    // A newcomer with the old mi1 token: refused, with the reason; with an invite made now: admitted.
    const d = await mesh.start({ name: 'd', model: null, join: a.token });
    await untilLine(a, /missed the rotation/, 30_000);
    expect((await a.status()).view.some((v) => v.id === d.id)).toBe(false);
    await d.stop();
    const invite = await cli(['invite', '--key-file', join(dir, 'a.key'), '--ttl', '5m']);
    expect(invite.code, invite.stderr).toBe(0);
    const e = await mesh.start({ name: 'e', model: null, join: invite.stdout.trim() });
    await waitLinked(a, e.id);
    await waitLinked(e, b.id);
    expect((await e.status()).node.keyEpoch).toBe(1);
  });
});
