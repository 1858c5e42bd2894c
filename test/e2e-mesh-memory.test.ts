// A mesh remembers itself (issue 10, item 4), with real node processes on loopback: the founder restarted
// with the same command line rejoins its mesh (same id, no "wrong mesh secret" anywhere), its mesh file is
// 0600 and names the peers; `--new-mesh` makes a fresh mesh; a `--join` for another mesh switches and says so.
import { readFileSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { makeE2eModel, startE2eNode, type E2eModel, type E2eNode } from './e2e-support.ts';

describe('e2e: the founder restarts and its mesh stays one', { timeout: 240_000 }, () => {
  let dir: string;
  let model: E2eModel;
  const nodes: E2eNode[] = [];
  const start = async (o: Parameters<typeof startE2eNode>[0]) => {
    const n = await startE2eNode(o);
    nodes.push(n);
    return n;
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mesh-memory-'));
    model = await makeE2eModel();
  });
  afterAll(async () => {
    await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
    await model?.remove();
    await rm(dir, { recursive: true, force: true });
  });

  const sees = (n: E2eNode, id: string) => n.waitStatus((s) => s.view.some((v) => v.id === id) && s.links.includes(id as never), 60_000, `a link to ${id.slice(0, 10)}`);

  it('rejoins after a restart, --new-mesh starts afresh, another mesh\'s --join switches', async () => {
    const founderArgs = { name: 'a', model, vram: 2, dir } as const;
    const a1 = await start(founderArgs);
    const meshId = (await a1.status()).node.meshId;
    expect(decodeInviteToken(a1.token).meshId).toBe(meshId);
    const b = await start({ name: 'b', model: null, join: a1.token, dir });
    await sees(a1, b.id);
    await sees(b, a1.id);

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
    await sees(a2, b.id);
    await sees(b, a2.id);
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
    const b2 = await start({ name: 'b', model: null, join: a3.token, dir });
    expect((await b2.status()).node.meshId).toBe(fresh);
    expect(b2.lines().join('\n')).toMatch(new RegExp(`switching mesh: the --join token is for mesh ${fresh.slice(0, 8)}; leaving the remembered mesh ${meshId.slice(0, 8)}`));
    await sees(b2, a3.id);
  });
});
