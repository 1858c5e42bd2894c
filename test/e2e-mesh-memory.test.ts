// A mesh remembers itself (issue 10, item 4), with real node processes on loopback: the founder restarted
// with the same command line rejoins its mesh (same id, no "wrong mesh secret" anywhere), its mesh file is
// 0600 and names the peers; `--new-mesh` makes a fresh mesh; a `--join` for another mesh switches and says so.
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { makeE2eMesh, type E2eMesh, type MeshNodeOptions, waitLinked } from './e2e-support.ts';

describe('e2e: the founder restarts and its mesh stays one', { timeout: 240_000 }, () => {
  // Key files, and so mesh files, live in the mesh's model dir.
  let mesh: E2eMesh;
  let dir: string;
  const start = (o: MeshNodeOptions) => mesh.start(o);

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    dir = mesh.model.dir;
  });
  afterAll(async () => {
    await mesh?.cleanup();
  });


  it('rejoins after a restart, --new-mesh starts afresh, another mesh\'s --join switches', async () => {
    const founderArgs = { name: 'a', vram: 2 } as const;
    const a1 = await start(founderArgs);
    const meshId = (await a1.status()).node.meshId;
    expect(decodeInviteToken(a1.token).meshId).toBe(meshId);
    const b = await start({ name: 'b', model: null, join: a1.token });
    await waitLinked(a1, b.id);
    await waitLinked(b, a1.id);

    await a1.stop();
    const file = join(dir, 'a.key.mesh.json');
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const saved = JSON.parse(readFileSync(file, 'utf8')) as { meshId: string; peers: { id: string }[] };
    expect(saved.meshId).toBe(meshId);
    expect(saved.peers.map((p) => p.id)).toContain(b.id);

    // The same command line: the same mesh, reached through B, whom the file remembers.
    const a2 = await start(founderArgs);
    expect(a2.id).toBe(a1.id);
    expect((await a2.status()).node.meshId).toBe(meshId);
    expect(decodeInviteToken(a2.token).meshId).toBe(meshId);
    await waitLinked(a2, b.id);
    await waitLinked(b, a2.id);
    expect((await b.status()).node.meshId).toBe(meshId);
    expect(a2.lines().join('\n')).toMatch(/rejoining the remembered mesh/);
    for (const n of [a1, a2, b]) expect(n.lines().join('\n')).not.toMatch(/wrong mesh secret/);

    // --new-mesh: a fresh id and secret, and the file follows.
    await a2.stop();
    const a3 = await start({ ...founderArgs, extraArgs: ['--new-mesh'] });
    const fresh = (await a3.status()).node.meshId;
    expect(fresh).not.toBe(meshId);
    expect(a3.lines().join('\n')).toMatch(/--new-mesh: a fresh mesh/);
    expect((JSON.parse(readFileSync(file, 'utf8')) as { meshId: string }).meshId).toBe(fresh);

    // B, restarted with a token of A's new mesh, switches from the mesh it remembers and says so.
    await b.stop();
    const b2 = await start({ name: 'b', model: null, join: a3.token });
    expect((await b2.status()).node.meshId).toBe(fresh);
    expect(b2.lines().join('\n')).toMatch(new RegExp(`switching mesh: the --join token is for mesh ${fresh.slice(0, 8)}; leaving the remembered mesh ${meshId.slice(0, 8)}`));
    await waitLinked(b2, a3.id);
  });
});
