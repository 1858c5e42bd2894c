// The mesh file (src/io/host/mesh-memory.ts): atomic 0600 writes, refusal of a damaged file, the choice of
// mesh at a start (remembered, --new-mesh, --join of the same or another mesh), bounded peers, debounce.
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { chooseMesh, MAX_REMEMBERED_PEERS, mergePeers, MeshMemoryError, MeshMemoryWriter, meshMemoryPath, readMeshMemory, writeMeshMemory, type RememberedMesh } from '../src/io/host/mesh-memory.ts';
import { createMeshId, createMeshSecret, type InviteToken } from '../src/io/wire/invite-token.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';

const id = (n: number) => asEndpointId(n.toString(16).padStart(64, '0'));
const mesh = (peers = 2): RememberedMesh => ({
  meshId: createMeshId(),
  secret: createMeshSecret(),
  peers: Array.from({ length: peers }, (_, i) => ({ id: id(i + 1), addrs: [`127.0.0.1:${4000 + i}`], name: `p${i}` })),
});
const token = (m: { meshId: string; secret: Uint8Array }, inviter = id(99)): InviteToken => ({ version: 1, meshId: m.meshId, secret: m.secret, inviter, addrs: ['127.0.0.1:5000'] });

let dir: string;
beforeEach(async () => void (dir = await mkdtemp(join(tmpdir(), 'mesh-memory-unit-'))));
afterEach(async () => rm(dir, { recursive: true, force: true }));

describe('the mesh file', () => {
  it('round-trips, mode 0600, no temp file left, next to its key file', async () => {
    const path = meshMemoryPath(join(dir, 'node.key'));
    expect(path).toBe(join(dir, 'node.key.mesh.json'));
    expect(await readMeshMemory(path)).toBeNull();
    const m = mesh();
    await writeMeshMemory(path, m);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(await readdir(dir)).toEqual(['node.key.mesh.json']);
    const back = await readMeshMemory(path);
    expect(back?.meshId).toBe(m.meshId);
    expect(Buffer.from(back!.secret).equals(Buffer.from(m.secret))).toBe(true);
    expect(back?.peers).toEqual(m.peers);
  });

  it('a damaged file is an error naming the way out, never a silent fresh mesh', async () => {
    const path = join(dir, 'x.mesh.json');
    await writeFile(path, '{"version":1,"meshId":"zz"}');
    await expect(readMeshMemory(path)).rejects.toThrow(MeshMemoryError);
    await expect(readMeshMemory(path)).rejects.toThrow(/damaged.*--new-mesh/);
  });

  it('debounces: many updates, one write; flush writes what is pending', async () => {
    const path = join(dir, 'd.mesh.json');
    const w = new MeshMemoryWriter(path, (e) => { throw e; }, 10_000);
    const m = mesh(0);
    for (let i = 0; i < 50; i++) w.update({ ...m, peers: [{ id: id(i + 1), addrs: ['127.0.0.1:1'] }] });
    expect(await readMeshMemory(path)).toBeNull();
    await w.flush();
    expect((await readMeshMemory(path))?.peers.map((p) => p.id)).toEqual([id(50)]);
    expect(JSON.parse(await readFile(path, 'utf8')).secret).toBe(Buffer.from(m.secret).toString('hex'));
  });
});

describe('the mesh a start chooses', () => {
  it('nothing remembered, no --join: a fresh mesh', () => {
    expect(chooseMesh([], null, false).how).toBe('new');
  });
  it('remembered, no --join: that mesh, through its peers (never itself)', () => {
    const m = mesh(3);
    const c = chooseMesh([], m, false, id(2));
    expect(c).toMatchObject({ how: 'remembered', meshId: m.meshId, secret: m.secret });
    expect(c.bootstrap.map((p) => p.id)).toEqual([id(1), id(3)]);
  });
  it('--new-mesh: a fresh mesh, naming the one left', () => {
    const m = mesh();
    const c = chooseMesh([], m, true);
    expect(c.how).toBe('new');
    expect(c.meshId).not.toBe(m.meshId);
    expect(c.left).toBe(m.meshId);
  });
  it('--join of the remembered mesh: the inviter first, then the known peers', () => {
    const m = mesh(2);
    const c = chooseMesh([token(m)], m, false);
    expect(c.how).toBe('joined');
    expect(c.bootstrap.map((p) => p.id)).toEqual([id(99), id(1), id(2)]);
  });
  it('--join of another mesh: switches, naming the one left', () => {
    const m = mesh();
    const other = { meshId: createMeshId(), secret: createMeshSecret() };
    const c = chooseMesh([token(other)], m, false);
    expect(c).toMatchObject({ how: 'switched', meshId: other.meshId, left: m.meshId });
    expect(c.bootstrap.map((p) => p.id)).toEqual([id(99)]);
  });
  it('peers are bounded, the view first, without duplicates or itself', () => {
    const many = Array.from({ length: 100 }, (_, i) => ({ id: id(i + 1), addrs: ['127.0.0.1:1'] }));
    const merged = mergePeers(many.slice(50), many, id(60));
    expect(merged).toHaveLength(MAX_REMEMBERED_PEERS);
    expect(merged[0]!.id).toBe(id(51));
    expect(merged.map((p) => p.id)).not.toContain(id(60));
    expect(new Set(merged.map((p) => p.id)).size).toBe(merged.length);
  });
});
