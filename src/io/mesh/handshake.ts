// The hello/admission handshake of one session: our hello (by mesh secret or expiring invite), checking the peer's
// (removed members refused by id; the secret before a rotation accepted from its members for a grace), admitting
// by invite with a welcome, and taking a welcome's secret.
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { HelloMessage, MeshMessage, RekeyMessage, WelcomeMessage } from '../../machines/protocol.ts';
import { checkHello, checkInviteHello, checkVersionAndId, makeHello, verifyHelloProof, type HelloCheck, type HelloFacts } from '../wire/mesh-auth.ts';
import { inviteKeyMatches, type ExpiringInvite } from '../wire/invite-token.ts';
import type { MeshKey } from '../wire/rekey.ts';
import { firstLine, type MeshEndpoint } from '../transport/transport.ts';
import type { Session } from './session.ts';
import type { Keyring } from './keyring.ts';
import { logLeaving, short, type PeerTable } from './peer-table.ts';

export interface HandshakeInit {
  /** The mesh secret as rotations change it; without one, a joiner by expiring invites waits for its welcome. */
  readonly keys: Keyring;
  readonly meshId: string | null;
  /** Expiring invites by inviter: presented only while we hold no secret. */
  readonly invites: ReadonlyMap<EndpointId, ExpiringInvite>;
  readonly onWelcome: (mesh: { readonly meshId: string } & MeshKey) => void;
  readonly now: () => number;
  /** What this node says about itself in its hello. */
  readonly hello: HelloFacts;
  readonly protocolVersion: number;
}

export class Handshake {
  private readonly keys: Keyring;
  private readonly meshId: string | null;
  private readonly invites: ReadonlyMap<EndpointId, ExpiringInvite>;
  private readonly onWelcome: HandshakeInit['onWelcome'];
  private readonly now: () => number;
  private readonly hello: HelloFacts;
  private readonly protocolVersion: number;

  constructor(
    init: HandshakeInit,
    private readonly id: EndpointId,
    private readonly table: PeerTable,
    private readonly endpoint: MeshEndpoint,
  ) {
    this.keys = init.keys;
    this.meshId = init.meshId;
    this.invites = init.invites;
    this.onWelcome = init.onWelcome;
    this.now = init.now;
    this.hello = init.hello;
    this.protocolVersion = init.protocolVersion;
  }

  /** The dialer speaks first: our hello, or a refusal when we can prove nothing to this peer. */
  greet(s: Session): void {
    const hello = this.ourHello(s);
    if (hello !== null) this.table.write(s, hello);
    else void this.table.fail(s, this.noSecretReason());
  }

  /** A message on a session still handshaking. Synchronous, like the read loop that calls it. */
  onMessage(s: Session, message: MeshMessage): void {
    if (message.type === 'leaving') {
      // The peer refused us (or is going away) before admitting us; both sides log the reason.
      logLeaving(s.log, message.reason);
      this.table.teardown(s, `refused by peer: ${message.reason}`);
      return;
    }
    if (message.type === 'welcome') {
      this.onWelcomeMessage(s, message);
      return;
    }
    if (message.type !== 'hello') {
      void this.table.fail(s, `expected hello first, got ${message.type}`);
      return;
    }
    if (s.pendingHello !== undefined) {
      void this.table.fail(s, 'a second hello before the welcome');
      return;
    }
    if (message.invite !== undefined) {
      this.onInviteHello(s, { ...message, invite: message.invite });
      return;
    }
    if (this.keys.isRemoved(s.id)) return this.table.refuse(s, this.removedCheck(s.id));
    const secret = this.keys.secret;
    if (secret === null) {
      // A joiner without the secret cannot check a proof of it: it trusts the inviter its invite names (the
      // QUIC handshake authenticated that id), and only once the welcome's secret proves this very hello.
      const check: HelloCheck = s.invite !== undefined ? checkVersionAndId(message, this.id, s.id, this.protocolVersion) : { ok: false, code: 'HELLO_PROOF', reason: this.noSecretReason() };
      if (!check.ok) return this.table.refuse(s, check);
      s.pendingHello = message;
      s.log.debug('inviter answered; waiting for its welcome');
      return;
    }
    const check = checkHello(message, secret, this.id, s.id, this.protocolVersion);
    if (check.ok) return this.admit(s, message);
    if (check.code === 'HELLO_PROOF') {
      // A member whose hello crossed a rotation still proves the secret before it, for a grace period.
      const grace = this.keys.graceSecretFor(s.id);
      if (grace !== null && verifyHelloProof(grace, s.id, this.id, message.proof)) {
        // It holds the old secret only: our hello proves that one, and the rekey follows at once.
        s.log.info('peer proved the secret before the last rotation (within its grace): admitted, and sent the rekey');
        this.admit(s, message, { answerWith: grace, then: this.keys.lastRekey ?? undefined });
        return;
      }
      const previous = this.keys.previousSecret;
      if (previous !== null && verifyHelloProof(previous, s.id, this.id, message.proof)) {
        const epoch = this.keys.current?.keyEpoch ?? 0;
        return this.table.refuse(s, {
          ok: false,
          code: 'HELLO_PROOF',
          reason: `the hello of ${short(s.id)} proves the mesh secret from before the rotation to key epoch ${epoch}: it missed the rotation (offline, or its token is old); give it a new invite (mesh-inference invite)`,
        });
      }
    }
    this.table.refuse(s, check);
  }

  private removedCheck(id: EndpointId): HelloCheck & { readonly ok: false } {
    const by = this.keys.current?.issuer;
    return {
      ok: false,
      code: 'REMOVED',
      reason: `node ${short(id)} was removed from this mesh${by ? ` (key epoch ${this.keys.current?.keyEpoch ?? 0}, last rotated by ${short(by)})` : ''}: its members refuse it; it can join another mesh (--new-mesh, or --join with another mesh's token)`,
    };
  }

  /**
   * Our hello to this peer: proving the mesh secret; or, while we hold none, proving the invite key of the
   * expiring invite this peer made (the invite rides along); null when we can prove neither to this peer.
   */
  private ourHello(s: Session): HelloMessage | null {
    const secret = this.keys.secret;
    if (secret !== null) return makeHello(this.hello, secret, this.id, s.id, this.protocolVersion);
    const invite = this.invites.get(s.id);
    if (invite === undefined) return null;
    s.invite = invite;
    return makeHello(this.hello, invite.inviteKey, this.id, s.id, this.protocolVersion, invite);
  }

  private noSecretReason(): string {
    const inviters = [...this.invites.keys()].map(short).join(', ');
    return `node ${short(this.id)} holds no mesh secret yet: it joins with an expiring invite, which only its inviter (${inviters || 'none'}) takes`;
  }

  private admit(s: Session, hello: HelloMessage, after: { readonly welcome?: WelcomeMessage; readonly answerWith?: Uint8Array; readonly then?: RekeyMessage } = {}): void {
    const { welcome } = after;
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    s.state = 'admitted';
    s.reported = true;
    if (s.conn.dialer === 'remote') {
      const ours = after.answerWith !== undefined ? makeHello(this.hello, after.answerWith, this.id, s.id, this.protocolVersion) : this.ourHello(s);
      if (ours !== null) this.table.write(s, ours);
    }
    // Right after our hello, before anything the node sends: the joiner admits us only with it.
    if (welcome !== undefined) this.table.write(s, welcome);
    if (after.then !== undefined) this.table.write(s, after.then);
    // The transport's verdict: streams of this connection that arrived early, and all later ones, are served.
    this.endpoint.admit(s.conn);
    const direct = s.conn.isDirect();
    s.log.info({ direct, role: hello.role, ...(welcome !== undefined ? { byInvite: true } : {}) }, welcome !== undefined ? 'peer admitted by an expiring invite; sent it the mesh secret' : 'peer admitted');
    this.table.emit({ type: 'net.peer.connected', id: s.id, direct });
    this.table.emit({ type: 'net.message', from: s.id, message: hello });
  }

  /** A joiner's hello presenting an expiring invite: checked with the secret we hold, answered with a welcome. */
  private onInviteHello(s: Session, hello: HelloMessage & { readonly invite: NonNullable<HelloMessage['invite']> }): void {
    if (s.conn.dialer !== 'remote') {
      void this.table.fail(s, 'an invite in an answering hello (a joiner presents its invite only when it dials)');
      return;
    }
    const key = this.keys.current;
    if (key === null || this.meshId === null) {
      return this.table.refuse(s, { ok: false, code: 'INVITE_INVITER', reason: `node ${short(this.id)} holds no mesh secret to check an invite with` });
    }
    if (this.keys.isRemoved(s.id)) return this.table.refuse(s, this.removedCheck(s.id));
    const check = checkInviteHello(hello, { meshId: this.meshId, secret: key.secret }, this.id, s.id, this.now(), this.protocolVersion);
    if (!check.ok) return this.table.refuse(s, check);
    s.log.info({ expiresAt: new Date(check.invite.expiresAt).toISOString() }, 'the peer joins with a valid expiring invite of ours');
    this.admit(s, hello, { welcome: { type: 'welcome', meshId: this.meshId, secret: key.secret, keyEpoch: key.keyEpoch, removed: key.removed } });
  }

  /** The joiner's side: the inviter's welcome; its secret must mint the invite's key and prove the inviter's hello. */
  private onWelcomeMessage(s: Session, welcome: WelcomeMessage): void {
    const invite = s.invite;
    const hello = s.pendingHello;
    if (invite === undefined || hello === undefined) {
      void this.table.fail(s, 'an unexpected welcome (this node presented no invite to this peer)');
      return;
    }
    if (welcome.meshId !== invite.meshId) {
      void this.table.fail(s, `the welcome is for mesh ${welcome.meshId.slice(0, 8)}, but the invite for ${invite.meshId.slice(0, 8)}`);
      return;
    }
    if (!inviteKeyMatches(invite, welcome.secret) || !verifyHelloProof(welcome.secret, s.id, this.id, hello.proof)) {
      void this.table.fail(s, 'the welcome\'s mesh secret does not match the invite (or the inviter\'s hello): not admitted');
      return;
    }
    s.pendingHello = undefined;
    if (this.keys.secret === null) {
      const key: MeshKey = { secret: welcome.secret, keyEpoch: welcome.keyEpoch ?? 0, issuer: null, removed: welcome.removed ?? [] };
      this.keys.learn(key);
      s.log.info({ meshId: welcome.meshId, keyEpoch: key.keyEpoch }, `admitted to mesh ${welcome.meshId.slice(0, 8)} by an expiring invite: this node now holds the mesh secret`);
      try {
        this.onWelcome({ meshId: welcome.meshId, ...key });
      } catch (err) {
        this.table.log.error({ err: firstLine(err) }, 'the welcome handler threw');
      }
    }
    this.admit(s, hello);
  }
}
