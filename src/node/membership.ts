// What a node holds of its mesh's membership, beside the node machine: the mesh secret as rotations change it
// (MeshKeyBox), the mesh file that remembers it with the known peers (rememberMesh), and the owner's rotate /
// remove command (rotateMesh, behind POST /api/mesh/rotate). The network (src/io/mesh) does the rotation on
// the wire; this file names members, writes the file, and answers.
import type { Actor, SnapshotFrom } from 'xstate';
import type { Logger } from '../io/host/logger.ts';
import { mergePeers, MeshMemoryWriter, retire, type MeshChoice, type RememberedMesh, type RememberedPeer } from '../io/host/mesh-memory.ts';
import { AdminRefusal } from '../io/http/api-admin.ts';
import type { MeshNetwork } from '../io/mesh/mesh-network.ts';
import { RotationError } from '../io/mesh/rekeying.ts';
import type { MeshKey } from '../io/wire/rekey.ts';
import type { RotationAnswer } from '../io/wire/admin-proof.ts';
import type { EndpointId } from '../machines/mesh-types.ts';
import type { nodeMachine } from '../machines/node.machine.ts';
import { DisposalStack } from './disposal.ts';

/** The mesh secret as it stands (a welcome fills it in, a rotation replaces it) and who hears of each change. */
export class MeshKeyBox {
  current: MeshKey | null;
  /** Fingerprints of the secrets rotations replaced (the mesh file keeps them). */
  retired: readonly string[];
  private readonly listeners: Array<(how: 'welcome' | 'rekey') => void> = [];

  constructor(choice: MeshChoice, remembered: RememberedMesh | null) {
    this.current = choice.secret === null ? null : { secret: choice.secret, ...choice.key };
    this.retired = remembered?.meshId === choice.meshId ? (remembered.retired ?? []) : [];
  }

  /** The network's welcome or rekey: the new key, the old secret retired. */
  take(key: MeshKey, how: 'welcome' | 'rekey'): void {
    if (this.current !== null && how === 'rekey') this.retired = retire(this.retired, this.current.secret);
    this.current = key;
    for (const l of this.listeners) l(how);
  }

  onChange(listener: (how: 'welcome' | 'rekey') => void): void {
    this.listeners.push(listener);
  }
}

type NodeActor = Actor<typeof nodeMachine>;

/** One line on how this start chose its mesh (new, remembered, joined, switched). */
export function logMeshChoice(log: Logger, mesh: MeshChoice, memory: { readonly path: string } | null): void {
  const id = mesh.meshId.slice(0, 8);
  const left = mesh.left?.slice(0, 8);
  switch (mesh.how) {
    case 'remembered':
      log.info({ meshId: mesh.meshId, peers: mesh.bootstrap.length, file: memory?.path, keyEpoch: mesh.key.keyEpoch }, `rejoining the remembered mesh ${id} through ${mesh.bootstrap.length} known peer(s)`);
      return;
    case 'switched':
      log.warn({ meshId: mesh.meshId, left: mesh.left, file: memory?.path }, `switching mesh: the --join token is for mesh ${id}; leaving the remembered mesh ${left}`);
      return;
    case 'joined':
      log.info({ meshId: mesh.meshId }, `joining mesh ${id}`);
      return;
    case 'new':
      if (mesh.left !== null) log.warn({ meshId: mesh.meshId, left: mesh.left }, `--new-mesh: a fresh mesh ${id}; leaving the remembered mesh ${left}`);
      else log.info({ meshId: mesh.meshId }, `a new mesh ${id}`);
  }
}

/**
 * Keeps the mesh file in step: written at once (the mesh chosen, so a restart finds it even after a crash),
 * then whenever the view's peers change (debounced) and at once when the secret changes; flushed on stop
 * (before the peers are told we leave). Returns the writer's flush (an admin answer waits for the file), or
 * null for a node with an ephemeral key (nothing remembered).
 */
export async function rememberMesh(
  stack: DisposalStack,
  init: { readonly actor: NodeActor; readonly mesh: MeshChoice; readonly keys: MeshKeyBox; readonly selfAddrs: readonly string[] },
  memory: { readonly path: string; readonly remembered: RememberedMesh | null } | null,
  log: Logger,
): Promise<(() => Promise<void>) | null> {
  if (memory === null) return null;
  const { actor, mesh, keys } = init;
  const writer = new MeshMemoryWriter(memory.path, (err) => log.warn({ err: err.message }, 'the mesh file could not be written'));
  const before = memory.remembered?.meshId === mesh.meshId ? memory.remembered.peers : [];
  const { meshId } = mesh;
  let known: readonly RememberedPeer[] = mergePeers(mesh.bootstrap, before);
  const remember = (snap: SnapshotFrom<typeof nodeMachine>): void => {
    const c = snap.context;
    const key = keys.current;
    const removed = new Set<string>(key?.removed ?? []);
    const inView: RememberedPeer[] = Object.values(c.view.announcements)
      .filter((a) => a.id !== c.self.id)
      .map((a) => ({ id: a.id, addrs: a.addrs.slice(0, 8), name: a.name }));
    known = mergePeers(inView, known, c.self.id).filter((p) => !removed.has(p.id));
    // A joiner by expiring invite writes nothing until its welcome: never a file without the real secret.
    if (key !== null) {
      writer.update({ meshId, secret: key.secret, keyEpoch: key.keyEpoch, keyIssuer: key.issuer, removed: key.removed, retired: keys.retired, peers: known, selfAddrs: init.selfAddrs });
    }
  };
  keys.onChange((how) => {
    remember(actor.getSnapshot());
    void writer.flush().then(() => {
      if (how === 'welcome') log.info({ file: memory.path }, `the mesh secret is saved in ${memory.path}: a restart rejoins mesh ${meshId.slice(0, 8)}; make invites with: mesh-inference invite`);
      else log.info({ file: memory.path, keyEpoch: keys.current?.keyEpoch }, `the rotated mesh secret is saved in ${memory.path}`);
    });
  });
  remember(actor.getSnapshot());
  await writer.flush();
  const sub = actor.subscribe({ next: remember, error: () => {} });
  stack.defer('mesh file', async () => {
    sub.unsubscribe();
    await writer.flush();
  });
  return () => writer.flush();
}

/**
 * The owner's rotation: names (or ids, or id prefixes of 8+ hex digits) resolved against the view, the secret
 * rotated across the live members, the mesh file written, then the answer. Unknown or ambiguous names and this
 * node itself are refused before anything changes.
 */
export async function rotateMesh(
  init: { readonly network: MeshNetwork | null; readonly actor: NodeActor; readonly meshId: string; readonly meshFile: string | null; readonly flush: (() => Promise<void>) | null },
  remove: readonly string[],
): Promise<RotationAnswer> {
  if (init.network === null) throw new AdminRefusal('this node runs without a mesh network that can rotate (a test double?)', 409);
  const c = init.actor.getSnapshot().context;
  const nameOfId = (id: EndpointId) => c.view.announcements[id]?.name ?? id.slice(0, 10);
  const ids = remove.map((r) => resolveMember(r, c.view.announcements, c.self.id));
  let outcome;
  try {
    outcome = init.network.rotate([...new Set(ids)]);
  } catch (err) {
    if (err instanceof RotationError) throw new AdminRefusal(err.message, 409);
    throw err;
  }
  await init.flush?.();
  return {
    meshId: init.meshId,
    keyEpoch: outcome.keyEpoch,
    told: outcome.told.map((id) => ({ id, name: nameOfId(id) })),
    removed: ids.map((id) => ({ id, name: nameOfId(id) })),
    meshFile: init.meshFile,
  };
}

function resolveMember(given: string, view: Readonly<Record<string, { readonly id: EndpointId; readonly name: string }>>, self: EndpointId): EndpointId {
  const needle = given.trim();
  const all = Object.values(view);
  let matches = /^[0-9a-f]{8,64}$/.test(needle) ? all.filter((a) => a.id.startsWith(needle)) : [];
  if (matches.length === 0) matches = all.filter((a) => a.name === needle);
  if (matches.length === 0 && /^[0-9a-f]{64}$/.test(needle)) return needle as EndpointId; // not in the view now: removed all the same
  if (matches.length === 0) throw new AdminRefusal(`no member named or with an id starting "${needle}" in this node's view (GET /api/status lists them)`);
  if (matches.length > 1) throw new AdminRefusal(`"${needle}" names ${matches.length} members (${matches.map((m) => `${m.name} ${m.id.slice(0, 10)}`).join(', ')}): give the id`);
  const id = matches[0]!.id;
  if (id === self) throw new AdminRefusal('a node cannot remove itself: run the command on another member, or stop this one');
  return id;
}
