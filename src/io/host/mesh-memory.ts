// A mesh remembers itself: next to each key file, `<key file>.mesh.json` (mode 0600) keeps the mesh id, the
// mesh secret (with its key epoch, the removed members and the fingerprints of the secrets it replaced) and the
// last known peers (ids and addresses) of the mesh that key's node belongs to, so the same
// command line rejoins that mesh after a restart, from any of its known peers. Written atomically (temp file +
// rename), debounced (the view changes with every gossip frame; the disk does not need to). Only key files
// have one: a node with an ephemeral key (in-process tests) remembers nothing.
import { chmod, mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { asEndpointId } from '../../machines/mesh-types.ts';
import { createMeshId, createMeshSecret, MESH_SECRET_BYTES, type ExpiringInvite, type InviteToken } from '../wire/invite-token.ts';
import { MAX_REMOVED, secretFingerprint } from '../wire/rekey.ts';

export const MESH_MEMORY_VERSION = 1;
/** Peers kept: the ones in the view first, then the ones remembered before, newest first. */
export const MAX_REMEMBERED_PEERS = 32;
const MAX_ADDRS_PER_PEER = 8;
/** Fingerprints of replaced secrets kept: enough to tell an old token on a reused command line from a newer one. */
const MAX_RETIRED = 16;

export interface RememberedPeer {
  readonly id: EndpointId;
  readonly addrs: readonly string[];
  readonly name?: string;
}

export interface RememberedMesh {
  readonly meshId: string;
  readonly secret: Uint8Array;
  readonly peers: readonly RememberedPeer[];
  /** This node's own last addresses ("ip:port"): what `mesh-inference invite` puts in a token. */
  readonly selfAddrs?: readonly string[];
  /** How many rotations the secret has been through (0: the founder's), and who made the last one. */
  readonly keyEpoch?: number;
  readonly keyIssuer?: EndpointId | null;
  /** Members removed from the mesh: refused by id. */
  readonly removed?: readonly EndpointId[];
  /** Fingerprints (secretFingerprint) of the secrets rotations replaced, newest last. */
  readonly retired?: readonly string[];
}

export class MeshMemoryError extends Error {
  override name = 'MeshMemoryError';
}

/** The mesh file of a key file. */
export function meshMemoryPath(keyPath: string): string {
  return `${keyPath}.mesh.json`;
}

/** The remembered mesh, or null when there is none. A file that is not one is an error, never ignored (a node that silently started a fresh mesh would split its old one). */
export async function readMeshMemory(path: string): Promise<RememberedMesh | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MeshMemoryError(`cannot read the mesh file ${path}: ${(err as Error).message}`);
  }
  const bad = (why: string) => new MeshMemoryError(`the mesh file ${path} is damaged (${why}); move it away (or start with --new-mesh or --join TOKEN)`);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw bad('not JSON');
  }
  const o = raw as { version?: unknown; meshId?: unknown; secret?: unknown; peers?: unknown; selfAddrs?: unknown; keyEpoch?: unknown; keyIssuer?: unknown; removed?: unknown; retired?: unknown };
  if (o === null || typeof o !== 'object' || o.version !== MESH_MEMORY_VERSION) throw bad(`version ${String(o?.version)}, expected ${MESH_MEMORY_VERSION}`);
  if (typeof o.meshId !== 'string' || !/^[0-9a-f]{32}$/.test(o.meshId)) throw bad('mesh id');
  if (typeof o.secret !== 'string' || !new RegExp(`^[0-9a-f]{${MESH_SECRET_BYTES * 2}}$`).test(o.secret)) throw bad('secret');
  const peers: RememberedPeer[] = [];
  for (const p of Array.isArray(o.peers) ? o.peers.slice(0, MAX_REMEMBERED_PEERS) : []) {
    const q = p as { id?: unknown; addrs?: unknown; name?: unknown };
    if (typeof q?.id !== 'string' || !/^[0-9a-f]{64}$/.test(q.id)) continue;
    const addrs = Array.isArray(q.addrs) ? q.addrs.filter((a): a is string => typeof a === 'string' && a.length <= 300).slice(0, MAX_ADDRS_PER_PEER) : [];
    peers.push({ id: asEndpointId(q.id), addrs, ...(typeof q.name === 'string' ? { name: q.name.slice(0, 64) } : {}) });
  }
  // Tighten a file readable by others, as the key file is.
  await chmod(path, 0o600).catch(() => {});
  const selfAddrs = Array.isArray(o.selfAddrs) ? o.selfAddrs.filter((a): a is string => typeof a === 'string' && a.length <= 300).slice(0, MAX_ADDRS_PER_PEER * 2) : [];
  if (o.keyEpoch !== undefined && !(Number.isSafeInteger(o.keyEpoch) && (o.keyEpoch as number) >= 0)) throw bad('key epoch');
  const ids = (v: unknown, max: number) => (Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string' && /^[0-9a-f]{64}$/.test(x)).slice(-max).map(asEndpointId) : []);
  return {
    meshId: o.meshId,
    secret: new Uint8Array(Buffer.from(o.secret, 'hex')),
    peers,
    selfAddrs,
    keyEpoch: (o.keyEpoch as number | undefined) ?? 0,
    keyIssuer: typeof o.keyIssuer === 'string' && /^[0-9a-f]{64}$/.test(o.keyIssuer) ? asEndpointId(o.keyIssuer) : null,
    removed: ids(o.removed, MAX_REMOVED),
    retired: Array.isArray(o.retired) ? o.retired.filter((f): f is string => typeof f === 'string' && /^[0-9a-f]{8}$/.test(f)).slice(-MAX_RETIRED) : [],
  };
}

/** Writes the whole file atomically (a temp file of mode 0600, then rename), so a crash leaves the old one or the new one. */
export async function writeMeshMemory(path: string, mesh: RememberedMesh): Promise<void> {
  const body = JSON.stringify(
    {
      version: MESH_MEMORY_VERSION,
      meshId: mesh.meshId,
      secret: Buffer.from(mesh.secret).toString('hex'),
      peers: mesh.peers.slice(0, MAX_REMEMBERED_PEERS).map((p) => ({ id: p.id, addrs: p.addrs.slice(0, MAX_ADDRS_PER_PEER), ...(p.name === undefined ? {} : { name: p.name }) })),
      ...(mesh.selfAddrs === undefined ? {} : { selfAddrs: mesh.selfAddrs.slice(0, MAX_ADDRS_PER_PEER * 2) }),
      keyEpoch: mesh.keyEpoch ?? 0,
      keyIssuer: mesh.keyIssuer ?? null,
      removed: (mesh.removed ?? []).slice(-MAX_REMOVED),
      retired: (mesh.retired ?? []).slice(-MAX_RETIRED),
      savedAt: new Date().toISOString(),
    },
    null,
    2,
  );
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  try {
    const fh = await open(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(`${body}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw new MeshMemoryError(`cannot write the mesh file ${path}: ${(err as Error).message}`);
  }
}

/** How this start chose its mesh. */
export type MeshChoice = {
  readonly meshId: string;
  /** Null when the node joins with expiring invites only: the inviter's welcome brings it. */
  readonly secret: Uint8Array | null;
  /** Where that secret stands in the mesh's rotations (from the mesh file; epoch 0 for a token's or a new secret). */
  readonly key: { readonly keyEpoch: number; readonly issuer: EndpointId | null; readonly removed: readonly EndpointId[] };
  /** The expiring invites to present (only while `secret` is null). */
  readonly invites: readonly ExpiringInvite[];
  /** Whom to dial first: the --join tokens' inviters, then the remembered peers of that same mesh. */
  readonly bootstrap: readonly RememberedPeer[];
  readonly how: 'new' | 'remembered' | 'joined' | 'switched';
  /** The mesh left behind when `how` is 'switched' or a --new-mesh replaced a remembered one. */
  readonly left: string | null;
};

/**
 * The mesh of this start: `--new-mesh` makes a fresh one; a `--join` token names its mesh (switching away
 * from a remembered other one); otherwise the remembered mesh, rejoined through its known peers; otherwise a
 * fresh one. An expiring invite (`mi2`) names its mesh too but carries no secret: the remembered secret of
 * that same mesh (a restart with the same command line), or the one an `mi1` of it carries, is proved
 * instead; else the node presents the invite to its inviter and waits for the welcome (`secret` null).
 */
export function chooseMesh(
  joins: readonly InviteToken[],
  remembered: RememberedMesh | null,
  newMesh: boolean,
  self?: EndpointId,
  invites: readonly ExpiringInvite[] = [],
): MeshChoice {
  const others = (peers: readonly RememberedPeer[]) => peers.filter((p) => p.id !== self);
  if (newMesh) return { meshId: createMeshId(), secret: createMeshSecret(), key: FOUNDING_KEY, invites: [], bootstrap: [], how: 'new', left: remembered?.meshId ?? null };
  const named = joins[0]?.meshId ?? invites[0]?.meshId;
  if (named !== undefined) {
    const inviters: RememberedPeer[] = [];
    for (const j of [...joins, ...invites]) if (j.inviter !== self && !inviters.some((i) => i.id === j.inviter)) inviters.push({ id: j.inviter, addrs: j.addrs });
    const same = remembered !== null && remembered.meshId === named;
    // A token's secret is the one to prove when it may be newer than the remembered one (a new token for a node
    // that missed a rotation); not when a rotation replaced it (the same command line after a restart).
    const token = joins[0]?.secret;
    const tokenIsOld = token !== undefined && same && (remembered.retired ?? []).includes(secretFingerprint(token));
    const secret = token !== undefined && !tokenIsOld ? token : same ? remembered.secret : null;
    const key = same && secret === remembered.secret ? rememberedKey(remembered) : FOUNDING_KEY;
    const known = same ? others(remembered.peers).filter((p) => !inviters.some((i) => i.id === p.id)) : [];
    return {
      meshId: named,
      secret,
      key: same ? { ...key, removed: remembered.removed ?? [] } : key,
      invites: secret === null ? invites : [],
      bootstrap: [...inviters, ...known],
      how: remembered === null || same ? 'joined' : 'switched',
      left: same ? null : (remembered?.meshId ?? null),
    };
  }
  if (remembered !== null) return { meshId: remembered.meshId, secret: remembered.secret, key: rememberedKey(remembered), invites: [], bootstrap: others(remembered.peers), how: 'remembered', left: null };
  return { meshId: createMeshId(), secret: createMeshSecret(), key: FOUNDING_KEY, invites: [], bootstrap: [], how: 'new', left: null };
}

const FOUNDING_KEY: MeshChoice['key'] = { keyEpoch: 0, issuer: null, removed: [] };

function rememberedKey(m: RememberedMesh): MeshChoice['key'] {
  return { keyEpoch: m.keyEpoch ?? 0, issuer: m.keyIssuer ?? null, removed: m.removed ?? [] };
}

/** The fingerprints of replaced secrets after `replaced` is replaced, bounded. */
export function retire(retired: readonly string[] | undefined, replaced: Uint8Array): string[] {
  return [...(retired ?? []), secretFingerprint(replaced)].slice(-MAX_RETIRED);
}

/**
 * The peers to remember: the view's (as they are now) first, then the ones remembered before that the view
 * does not hold (a peer that is down now may be the one up at the next start), bounded.
 */
export function mergePeers(current: readonly RememberedPeer[], before: readonly RememberedPeer[], self?: EndpointId): RememberedPeer[] {
  const out: RememberedPeer[] = [];
  const seen = new Set<string>(self === undefined ? [] : [self]);
  for (const p of [...current, ...before]) {
    if (seen.has(p.id) || p.addrs.length === 0) continue;
    seen.add(p.id);
    out.push(p);
    if (out.length >= MAX_REMEMBERED_PEERS) break;
  }
  return out;
}

/** The store a node writes through: the last write wins, writes are debounced, `flush` writes what is pending. */
export class MeshMemoryWriter {
  private pending: RememberedMesh | null = null;
  private lastKey = '';
  private timer: NodeJS.Timeout | null = null;
  private writing: Promise<void> = Promise.resolve();

  constructor(
    readonly path: string,
    private readonly onError: (err: Error) => void,
    private readonly debounceMs = 2_000,
  ) {}

  /** Remembers `mesh` (soon): nothing is written when it equals what was last written. */
  update(mesh: RememberedMesh): void {
    const key = JSON.stringify([mesh.meshId, Buffer.from(mesh.secret).toString('hex'), mesh.peers, mesh.selfAddrs, mesh.keyEpoch, mesh.removed]);
    if (key === this.lastKey) return;
    this.lastKey = key;
    this.pending = mesh;
    this.timer ??= setTimeout(() => void this.flush(), this.debounceMs);
  }

  /** Writes now what is pending; resolves once it is on disk (errors go to onError). */
  flush(): Promise<void> {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    const mesh = this.pending;
    this.pending = null;
    if (mesh !== null) this.writing = this.writing.then(() => writeMeshMemory(this.path, mesh).catch((err: Error) => this.onError(err)));
    return this.writing;
  }
}
