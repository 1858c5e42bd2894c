// Rotation of the mesh secret over the admitted control streams (the message: src/io/wire/rekey.ts). A member
// rotates (`rotate`: a fresh secret, the next key epoch, members to remove), or takes a newer rekey from a peer
// (`onRekey`); either way it sends the rekey, verbatim, to every admitted peer but the one it came from and
// the removed, closes the removed members' connections, tells the node to forget them, and hands the new key
// to its owner (the mesh file). A rekey that is not newer, or not validly signed for this mesh, changes nothing.
import type { KeyObject } from 'node:crypto';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { RekeyMessage } from '../../machines/protocol.ts';
import { makeRekey, secretFingerprint, verifyRekey, type MeshKey } from '../wire/rekey.ts';
import { firstLine } from '../transport/transport.ts';
import type { Session } from './session.ts';
import type { Keyring } from './keyring.ts';
import { short, type PeerTable } from './peer-table.ts';

export interface RotationResult {
  readonly keyEpoch: number;
  /** The members the rekey was sent to. */
  readonly told: readonly EndpointId[];
  /** Members removed by this rotation (not counting the ones removed before). */
  readonly removed: readonly EndpointId[];
}

export class RotationError extends Error {
  override name = 'RotationError';
}

export class Rekeying {
  constructor(
    private readonly table: PeerTable,
    private readonly keys: Keyring,
    private readonly self: EndpointId,
    private readonly meshId: string | null,
    /** The endpoint key that signs our rekeys; null: this node cannot rotate (it can still take rekeys). */
    private readonly signingKey: KeyObject | null,
    private readonly onKey: (key: MeshKey & { readonly meshId: string }) => void,
    private readonly now: () => number,
  ) {}

  /** Rotates the secret now, removing `remove` (ids); throws RotationError when this node cannot. */
  rotate(remove: readonly EndpointId[]): RotationResult {
    const current = this.keys.current;
    if (this.meshId === null || current === null) throw new RotationError('this node holds no mesh secret yet (it waits for its welcome): nothing to rotate');
    if (this.signingKey === null) throw new RotationError('this node has no endpoint key to sign a rotation with');
    if (remove.includes(this.self)) throw new RotationError('a node cannot remove itself: stop it, or rotate from another member');
    const rekey = makeRekey({ key: this.signingKey, issuer: this.self, meshId: this.meshId, current, remove, now: this.now() });
    const outcome = this.apply(rekey, null);
    if (outcome === null) throw new RotationError('the rotation was not newer than the key held (a concurrent rotation won): try again');
    return outcome;
  }

  /** A rekey from an admitted peer. */
  onRekey(s: Session, rekey: RekeyMessage): void {
    if (this.meshId === null || !verifyRekey(this.meshId, rekey)) {
      void this.table.fail(s, `a rekey that is not validly signed for this mesh (issuer ${short(rekey.issuer)})`);
      return;
    }
    if (rekey.removed.includes(this.self)) {
      // Members never send a rekey to the members it removes: a removed node never holds the new secret.
      s.log.warn({ issuer: short(rekey.issuer), keyEpoch: rekey.keyEpoch }, `a rekey that removes this node (issued by ${short(rekey.issuer)}): ignored; the members close this node's connections`);
      return;
    }
    this.apply(rekey, s.id);
  }

  private apply(rekey: RekeyMessage, from: EndpointId | null): RotationResult | null {
    const admitted = [...this.table.sessions.values()].filter((s) => s.state === 'admitted');
    const newlyRemoved = this.keys.adopt(
      rekey,
      admitted.map((s) => s.id),
    );
    if (newlyRemoved === null) return null; // not newer: already taken (or superseded); nothing to relay
    const removed = new Set(rekey.removed);
    const told: EndpointId[] = [];
    for (const s of admitted) {
      if (removed.has(s.id)) continue;
      if (s.id !== from) this.table.write(s, rekey);
      told.push(s.id);
    }
    const by = rekey.issuer === this.self ? 'this node' : short(rekey.issuer);
    this.table.log.info(
      { keyEpoch: rekey.keyEpoch, issuer: short(rekey.issuer), secret: secretFingerprint(rekey.secret), removed: newlyRemoved.map(short), relayedTo: told.length },
      `mesh secret rotated to key epoch ${rekey.keyEpoch} by ${by}${newlyRemoved.length > 0 ? `, removing ${newlyRemoved.map(short).join(', ')}` : ''}: invites and tokens made before no longer admit`,
    );
    for (const id of newlyRemoved) {
      const s = this.table.sessions.get(id);
      const reason = `removed from the mesh by ${short(rekey.issuer)} (key epoch ${rekey.keyEpoch})`;
      if (s !== undefined) void this.table.closeSession(s, reason, reason);
    }
    if (newlyRemoved.length > 0) this.table.emit({ type: 'net.peers.removed', ids: newlyRemoved });
    try {
      this.onKey({ meshId: rekey.meshId, secret: rekey.secret, keyEpoch: rekey.keyEpoch, issuer: rekey.issuer, removed: rekey.removed });
    } catch (err) {
      this.table.log.error({ err: firstLine(err) }, 'the rekey handler threw');
    }
    return { keyEpoch: rekey.keyEpoch, told, removed: newlyRemoved };
  }
}
