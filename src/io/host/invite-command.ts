// `mesh-inference invite`: an expiring invite (mi2) for the mesh this key file's node belongs to, made from
// the key file (the inviter's signature) and its mesh file (the mesh id, the secret the invite key derives
// from, this node's last addresses). No running node or API is asked: those 0600 files are the same trust as
// the key itself. The node that made the invite must be running to admit the joiner: only it takes it.
import { decodeExpiringInvite, encodeExpiringInvite } from '../wire/invite-token.ts';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { meshMemoryPath, readMeshMemory } from './mesh-memory.ts';
import { readSecretKey } from './secret-key.ts';

export class InviteCommandError extends Error {
  override name = 'InviteCommandError';
}

export interface MadeInvite {
  readonly token: string;
  readonly meshId: string;
  readonly inviter: EndpointId;
  readonly expiresAt: number;
  readonly addrs: readonly string[];
  readonly meshFile: string;
}

export async function makeInviteFromFiles(init: { readonly keyFile: string | null; readonly ttlMs: number; readonly now?: number; readonly env?: NodeJS.ProcessEnv }): Promise<MadeInvite> {
  const key = await readSecretKey({ keyFile: init.keyFile ?? undefined, env: init.env });
  if (key === null) {
    throw new InviteCommandError(`no key file at ${init.keyFile ?? 'the default place'}: start a node first (it creates the key and founds or joins a mesh), or name its key with --key-file`);
  }
  const meshFile = meshMemoryPath(key.path);
  const mesh = await readMeshMemory(meshFile);
  if (mesh === null) {
    throw new InviteCommandError(`no mesh file at ${meshFile}: this node has not founded or joined a mesh yet; start it once (mesh-inference --model ... --key-file ${key.path}), then make the invite`);
  }
  const now = init.now ?? Date.now();
  const addrs = mesh.selfAddrs ?? [];
  const token = encodeExpiringInvite({ meshId: mesh.meshId, secret: mesh.secret, secretKey: key.key, addrs, ttlMs: init.ttlMs, now });
  const made = decodeExpiringInvite(token);
  return { token, meshId: mesh.meshId, inviter: made.inviter, expiresAt: made.expiresAt, addrs: made.addrs, meshFile };
}
