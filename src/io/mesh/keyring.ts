// The mesh secret a node holds, as rotations change it (src/io/wire/rekey.ts): the current key, the removed
// members, and the previous secret for a short grace after a rotation, accepted only from the members that
// were admitted when it rotated (a hello already under way when the rekey arrived still passes; a removed
// member, or a stranger holding an old token, does not).
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { RekeyMessage } from '../../machines/protocol.ts';
import { isNewerKey, MAX_REMOVED, type MeshKey } from '../wire/rekey.ts';

/** How long the secret before a rotation still admits the members of that moment. */
export const REKEY_GRACE_MS = 30_000;

interface Previous {
  readonly secret: Uint8Array;
  readonly until: number;
  readonly members: ReadonlySet<EndpointId>;
}

export class Keyring {
  private key: MeshKey | null;
  private previous: Previous | null = null;
  private removedIds: Set<EndpointId>;
  /** The rekey that made the current key: a member let in on the grace gets it at once. */
  private latest: RekeyMessage | null = null;

  constructor(
    initial: MeshKey | null,
    private readonly now: () => number,
    private readonly graceMs = REKEY_GRACE_MS,
  ) {
    this.key = initial;
    this.removedIds = new Set(initial?.removed ?? []);
  }

  /** The secret to prove and check hellos with; null while a joiner by invite waits for its welcome. */
  get secret(): Uint8Array | null {
    return this.key?.secret ?? null;
  }

  get current(): MeshKey | null {
    return this.key;
  }

  isRemoved(id: EndpointId): boolean {
    return this.removedIds.has(id);
  }

  /** The secret before the last rotation, while its grace lasts and only for a member of that moment. */
  graceSecretFor(id: EndpointId): Uint8Array | null {
    const p = this.previous;
    if (p === null || this.now() >= p.until || !p.members.has(id)) return null;
    return p.secret;
  }

  get lastRekey(): RekeyMessage | null {
    return this.latest;
  }

  /** The secret before the last rotation (any age): to tell a peer that missed a rotation why it is refused. */
  get previousSecret(): Uint8Array | null {
    return this.previous?.secret ?? null;
  }

  /** The first secret of a joiner by invite (its inviter's welcome). */
  learn(key: MeshKey): void {
    this.key = key;
    this.removedIds = new Set(key.removed);
  }

  /**
   * Takes `rekey` when it is newer than the key held (the caller checked its signature and mesh); `members` are
   * the peers admitted now, who may still prove the old secret for the grace period. Returns the ids removed
   * by this rekey that were not removed before, or null when the rekey is not newer.
   */
  adopt(rekey: RekeyMessage, members: Iterable<EndpointId>): EndpointId[] | null {
    if (this.key !== null && !isNewerKey(rekey, this.key)) return null;
    const newlyRemoved = rekey.removed.filter((id) => !this.removedIds.has(id));
    if (this.key !== null) {
      const stay = [...members].filter((id) => !rekey.removed.includes(id));
      this.previous = { secret: this.key.secret, until: this.now() + this.graceMs, members: new Set(stay) };
    }
    this.key = { secret: rekey.secret, keyEpoch: rekey.keyEpoch, issuer: rekey.issuer, removed: rekey.removed.slice(-MAX_REMOVED) };
    this.removedIds = new Set(this.key.removed);
    this.latest = rekey;
    return newlyRemoved;
  }
}
