// The network layer of one node: accepts and dials connections, admits peers by their hello, and turns
// control-stream frames into NetworkEvents (and NetworkCommands into frames). Admission is also the
// transport's verdict (MeshEndpoint.admit/refuse): until a connection's hello is verified, none of its
// streams but the control stream reaches a handler (rpc, http, direct tunnels included). A bad peer is closed with a
// logged reason; nothing it sends can throw out of here or disturb the other peers.
import type { Logger } from 'pino';
import { PROTOCOL_VERSION, type EndpointId } from '../../machines/mesh-types.ts';
import type { HelloMessage, MeshMessage, NetworkCommand, NetworkEvent, WelcomeMessage } from '../../machines/protocol.ts';
import { checkHello, checkInviteHello, checkVersionAndId, makeHello, verifyHelloProof, type HelloCheck, type HelloFacts } from '../wire/mesh-auth.ts';
import { inviteKeyMatches, type ExpiringInvite } from '../wire/invite-token.ts';
import { encodeFrame, FrameDecoder } from '../wire/frame-codec.ts';
import { firstLine, type MeshConnection, type MeshEndpoint, type MeshStream } from '../transport/transport.ts';
import { ControlWriter, doneSignal, type Session } from './session.ts';

export interface MeshNetworkInit {
  /**
   * The mesh secret from the invite token, the mesh file, or created by the first node; null for a node that
   * joins with expiring invites only, until its inviter's `welcome` brings the secret.
   */
  readonly secret: Uint8Array | null;
  /** The mesh's id: without it this node neither admits by expiring invites nor takes a welcome. */
  readonly meshId?: string;
  /** The expiring invites this node joins with while it holds no secret: each is shown only to its inviter. */
  readonly invites?: readonly ExpiringInvite[];
  /** Called once when a welcome brought the mesh secret (the node saves it in its mesh file). */
  readonly onWelcome?: (mesh: { readonly meshId: string; readonly secret: Uint8Array }) => void;
  /** The clock invites expire by (tests). */
  readonly now?: () => number;
  /** What this node says about itself in its hello. */
  readonly hello: HelloFacts;
  /** A dial that has not connected by then fails (a dead address would otherwise take QUIC's 30 s). */
  readonly dialTimeoutMs?: number;
  /** A connection whose peer has not sent a valid hello by then is closed. */
  readonly helloTimeoutMs?: number;
  /** After `leaving` is written, how long to wait for the peer to hang up before closing ourselves. */
  readonly closeLingerMs?: number;
  /** Bytes queued towards one peer beyond which it counts as not reading and is closed. */
  readonly maxQueuedBytes?: number;
  /** Frames above this many bytes close the peer that sent them. */
  readonly maxFrameBytes?: number;
  /** Protocol version written into our hello: tests use it to play an incompatible node. */
  readonly protocolVersion?: number;
}

export interface MeshNetworkComponents {
  readonly endpoint: MeshEndpoint;
  readonly logger: Logger;
}

const DEFAULTS = {
  dialTimeoutMs: 5_000,
  helloTimeoutMs: 5_000,
  closeLingerMs: 300,
  maxQueuedBytes: 16 * 1024 * 1024,
  maxFrameBytes: 1024 * 1024,
};

type Tunables = Omit<MeshNetworkInit, 'secret' | 'meshId' | 'invites' | 'onWelcome' | 'now'>;

export class MeshNetwork {
  readonly id: EndpointId;
  private readonly init: Required<Tunables>;
  /** The mesh secret; changes once, from null, when a joiner's welcome arrives. */
  private secret: Uint8Array | null;
  private readonly meshId: string | null;
  /** Expiring invites by inviter: presented only while we hold no secret. */
  private readonly invites: ReadonlyMap<EndpointId, ExpiringInvite>;
  private readonly onWelcome: NonNullable<MeshNetworkInit['onWelcome']>;
  private readonly now: () => number;
  private readonly endpoint: MeshEndpoint;
  private readonly log: Logger;
  private readonly sessions = new Map<EndpointId, Session>();
  private readonly dialing = new Set<EndpointId>();
  /** Connections whose session has ended: never adopted again. */
  private readonly retired = new WeakSet<MeshConnection>();
  private emit: (event: NetworkEvent) => void = () => {};
  private running = false;
  private stopped = false;

  constructor(init: MeshNetworkInit, components: MeshNetworkComponents) {
    const { secret, meshId, invites, onWelcome, now, ...tunables } = init;
    this.init = { ...DEFAULTS, protocolVersion: PROTOCOL_VERSION, ...tunables };
    this.secret = secret;
    this.meshId = meshId ?? null;
    this.invites = new Map((invites ?? []).map((i) => [i.inviter, i]));
    this.onWelcome = onWelcome ?? (() => {});
    this.now = now ?? Date.now;
    this.endpoint = components.endpoint;
    this.id = components.endpoint.id;
    this.log = components.logger;
  }

  /** Starts accepting; every event from now on goes to `onEvent`. A MeshNetwork starts once. */
  start(onEvent: (event: NetworkEvent) => void): void {
    if (this.running || this.stopped) return;
    this.running = true;
    this.emit = (event) => {
      try {
        onEvent(event);
      } catch (err) {
        this.log.error({ err, event: event.type }, 'network event handler threw');
      }
    };
    this.endpoint.handle('control', (stream, conn) => this.onControlStream(stream, conn));
    void this.acceptLoop();
  }

  /** Executes one command from the node. Never throws; failures become events or log lines. */
  execute(command: NetworkCommand): void {
    try {
      switch (command.type) {
        case 'net.dial':
          void this.dial(command.id, command.addrs);
          return;
        case 'net.send':
          this.send(command.to, command.message);
          return;
        case 'net.close':
          void this.close(command.id, command.reason);
          return;
        default:
          this.log.warn({ command: (command as { type?: unknown }).type }, 'unknown network command ignored');
      }
    } catch (err) {
      this.log.error({ err: firstLine(err), command: (command as { type?: unknown }).type }, 'network command failed');
    }
  }

  /** Ids of the admitted peers. */
  peers(): EndpointId[] {
    return [...this.sessions.values()].filter((s) => s.state === 'admitted').map((s) => s.id);
  }

  /** Connects and handshakes; the outcome arrives as net.peer.connected or net.peer.disconnected. */
  async dial(id: EndpointId, addrs: readonly string[]): Promise<void> {
    if (!this.running) return;
    if (id === this.id) return;
    const existing = this.sessions.get(id);
    if (existing && (existing.state === 'handshaking' || existing.state === 'admitted')) {
      // Already connected or handshaking (perhaps inbound): the node hears how that one ends.
      existing.reported = true;
      if (existing.state === 'admitted') this.emit({ type: 'net.peer.connected', id, direct: existing.conn.isDirect() });
      return;
    }
    if (this.dialing.has(id)) return;
    this.dialing.add(id);
    // A session on its way out still holds the transport's connection: let it finish, then dial afresh.
    if (existing && existing.state === 'closing') await existing.done;
    const log = this.peerLog(id);
    log.debug({ addrs }, 'dialing');
    let conn: MeshConnection;
    try {
      conn = await this.endpoint.dial(id, addrs, { timeoutMs: this.init.dialTimeoutMs });
      if (this.retired.has(conn)) {
        // The transport forgets a connection only once its close completes: wait for that and dial afresh.
        await withDeadline(conn.closed, 2_000);
        conn = await this.endpoint.dial(id, addrs, { timeoutMs: this.init.dialTimeoutMs });
        if (this.retired.has(conn)) throw new Error('the previous connection is still closing');
      }
    } catch (err) {
      this.dialing.delete(id);
      const reason = `dial failed: ${firstLine(err)}`;
      log.info({ addrs }, reason);
      // An inbound connection may have arrived meanwhile: then that one speaks for the peer.
      const s = this.sessions.get(id);
      if (s && s.state !== 'closed') s.reported = true;
      else if (this.running) this.emit({ type: 'net.peer.disconnected', id, reason });
      return;
    }
    this.dialing.delete(id);
    if (!this.running) return; // stop() closed the endpoint's connections or the owner will
    this.sessionFor(conn).reported = true;
  }

  /** Queues a message to an admitted peer (dropped otherwise). Sending `leaving` closes the connection after it. */
  send(to: EndpointId, message: MeshMessage): void {
    const s = this.sessions.get(to);
    if (!s || s.state !== 'admitted') {
      this.log.debug({ peer: short(to), type: message.type }, 'send to a peer that is not connected: dropped');
      return;
    }
    if (message.type === 'leaving') {
      // The peer drops us when it reads it; closing after it makes the end the same on both sides.
      void this.close(to, message.reason);
      return;
    }
    this.write(s, message);
  }

  /** Sends `leaving`, lets it arrive, then closes. Resolves once the connection is closed. */
  async close(id: EndpointId, reason: string): Promise<void> {
    const s = this.sessions.get(id);
    if (!s || s.state === 'closing' || s.state === 'closed') return;
    s.log.info({ reason }, 'closing connection');
    await this.closeSession(s, `closed: ${reason}`, reason);
  }

  /** Closes every peer (each gets `leaving`) and stops accepting. The endpoint itself stays with its owner. */
  async stop(reason = 'node stopping'): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (!this.running) return;
    this.endpoint.unhandle('control');
    await Promise.all([...this.sessions.values()].map((s) => this.closeSession(s, `closed: ${reason}`, reason)));
    this.running = false;
    this.emit = () => {};
  }

  // ---- sessions ----

  private async acceptLoop(): Promise<void> {
    while (this.running) {
      let conn: MeshConnection | null;
      try {
        conn = await this.endpoint.accept();
      } catch (err) {
        if (!this.running) return;
        this.log.warn({ err: firstLine(err) }, 'accept failed');
        continue;
      }
      if (conn === null) {
        if (this.running) this.log.info('endpoint closed; no more incoming connections');
        return;
      }
      if (!this.running) {
        conn.close('node stopping');
        return;
      }
      this.sessionFor(conn);
    }
  }

  /**
   * The session of a connection, created on first sight. The transport keeps one connection per pair, so a
   * new connection from a known id means the old one is stale (say, the peer restarted): it ends.
   */
  private sessionFor(conn: MeshConnection): Session {
    const id = conn.remoteId;
    const previous = this.sessions.get(id);
    if (previous && previous.conn === conn) return previous;
    const session: Session = {
      id,
      conn,
      log: this.peerLog(id).child({ dir: conn.dialer === 'local' ? 'out' : 'in' }),
      state: 'handshaking',
      reported: previous !== undefined && (previous.reported || previous.state === 'admitted'),
      stream: null,
      out: new ControlWriter(this.init.maxQueuedBytes, (err) => {
        if (session.state === 'handshaking' || session.state === 'admitted') this.teardown(session, `write failed: ${firstLine(err)}`);
      }),
      helloTimer: null,
      ...doneSignal(),
    };
    if (previous) {
      const wasAdmitted = previous.state === 'admitted';
      previous.log.info('replaced by a newer connection');
      previous.reported = false; // the successor speaks for this peer now
      this.teardown(previous, 'replaced by a newer connection');
      // The node saw this peer connected; it sees it go before the new connection's hello brings it back.
      if (wasAdmitted && this.running) this.emit({ type: 'net.peer.disconnected', id, reason: 'replaced by a newer connection' });
    }
    this.sessions.set(id, session);
    session.helloTimer = setTimeout(() => {
      if (session.state === 'handshaking') void this.fail(session, `no valid hello within ${this.init.helloTimeoutMs} ms`);
    }, this.init.helloTimeoutMs);
    void conn.closed.then((info) => {
      if (session.state === 'closed') return;
      const reason = info.byPeer ? `connection closed by peer: ${info.reason}` : `connection closed: ${info.reason}`;
      if (session.state === 'admitted') session.log.info({ reason }, 'peer disconnected');
      this.teardown(session, reason);
    });
    // The connection's dialer opens the control stream; the other side receives it in onControlStream.
    if (conn.dialer === 'local') void this.openControl(session);
    return session;
  }

  private async openControl(s: Session): Promise<void> {
    let stream: MeshStream;
    try {
      stream = await s.conn.openStream('control');
    } catch (err) {
      this.teardown(s, `could not open the control stream: ${firstLine(err)}`);
      return;
    }
    if (s.state === 'closed') {
      stream.reset();
      return;
    }
    this.attach(s, stream);
  }

  private onControlStream(stream: MeshStream, conn: MeshConnection): void {
    if (!this.running || this.retired.has(conn)) {
      stream.reset();
      return;
    }
    const s = this.sessionFor(conn);
    if (s.stream !== null || conn.dialer === 'local' || s.state !== 'handshaking') {
      s.log.warn('peer opened a second control stream; reset it');
      stream.reset();
      return;
    }
    this.attach(s, stream);
  }

  private attach(s: Session, stream: MeshStream): void {
    s.stream = stream;
    s.out.attach(stream);
    // The dialer speaks first; the acceptor answers with its hello only once the dialer's is verified, so a
    // stranger learns nothing about this node (role, VRAM, model), only why it was refused.
    void this.readLoop(s, stream);
    if (s.conn.dialer === 'local') {
      const hello = this.ourHello(s);
      if (hello !== null) this.write(s, hello);
      else void this.fail(s, this.noSecretReason());
    }
  }

  /**
   * Our hello to this peer: proving the mesh secret; or, while we hold none, proving the invite key of the
   * expiring invite this peer made (the invite rides along); null when we can prove neither to this peer.
   */
  private ourHello(s: Session): HelloMessage | null {
    if (this.secret !== null) return makeHello(this.init.hello, this.secret, this.id, s.id, this.init.protocolVersion);
    const invite = this.invites.get(s.id);
    if (invite === undefined) return null;
    s.invite = invite;
    return makeHello(this.init.hello, invite.inviteKey, this.id, s.id, this.init.protocolVersion, invite);
  }

  private noSecretReason(): string {
    const inviters = [...this.invites.keys()].map(short).join(', ');
    return `node ${short(this.id)} holds no mesh secret yet: it joins with an expiring invite, which only its inviter (${inviters || 'none'}) takes`;
  }

  private async readLoop(s: Session, stream: MeshStream): Promise<void> {
    const decoder = new FrameDecoder({ maxFrameBytes: this.init.maxFrameBytes });
    try {
      for (;;) {
        const chunk = await stream.read();
        if (s.state === 'closed') return;
        if (chunk === null) {
          const cut = decoder.end();
          if (s.state !== 'closing') this.teardown(s, cut ? `peer ended its control stream: ${cut.message}` : 'peer ended its control stream');
          return;
        }
        const { messages, error } = decoder.push(chunk);
        for (const message of messages) {
          if (s.state === 'closing' && message.type === 'leaving') {
            // Both sides may refuse (or close) at once: the peer's reason still belongs in our log.
            logLeaving(s.log, message.reason);
            continue;
          }
          if (s.state !== 'handshaking' && s.state !== 'admitted') continue;
          this.onMessage(s, message);
        }
        if (error !== null) {
          // The messages before the bad frame were fine and are delivered; the stream cannot be trusted after it.
          void this.fail(s, `${error.name}: ${error.message}`);
          return;
        }
      }
    } catch (err) {
      if (s.state === 'handshaking' || s.state === 'admitted') this.teardown(s, `control stream failed: ${firstLine(err)}`);
    }
  }

  /** Synchronous, so the read loop keeps reading while a session closes (the peer's `leaving` still gets logged). */
  private onMessage(s: Session, message: MeshMessage): void {
    if (s.state === 'handshaking') {
      if (message.type === 'leaving') {
        // The peer refused us (or is going away) before admitting us; both sides log the reason.
        logLeaving(s.log, message.reason);
        this.teardown(s, `refused by peer: ${message.reason}`);
        return;
      }
      if (message.type === 'welcome') {
        this.onWelcomeMessage(s, message);
        return;
      }
      if (message.type !== 'hello') {
        void this.fail(s, `expected hello first, got ${message.type}`);
        return;
      }
      if (s.pendingHello !== undefined) {
        void this.fail(s, 'a second hello before the welcome');
        return;
      }
      if (message.invite !== undefined) {
        this.onInviteHello(s, { ...message, invite: message.invite });
        return;
      }
      if (this.secret === null) {
        // A joiner without the secret cannot check a proof of it: it trusts the inviter its invite names (the
        // QUIC handshake authenticated that id), and only once the welcome's secret proves this very hello.
        const check: HelloCheck = s.invite !== undefined ? checkVersionAndId(message, this.id, s.id, this.init.protocolVersion) : { ok: false, code: 'HELLO_PROOF', reason: this.noSecretReason() };
        if (!check.ok) return this.refuse(s, check);
        s.pendingHello = message;
        s.log.debug('inviter answered; waiting for its welcome');
        return;
      }
      const check = checkHello(message, this.secret, this.id, s.id, this.init.protocolVersion);
      if (!check.ok) return this.refuse(s, check);
      this.admit(s, message);
      return;
    }
    if (s.state !== 'admitted') return;
    switch (message.type) {
      case 'hello':
        void this.fail(s, 'a second hello on an admitted connection');
        return;
      case 'welcome':
        void this.fail(s, 'a welcome on an admitted connection');
        return;
      case 'leaving':
        s.log.info({ reason: message.reason }, `peer is leaving: ${message.reason}`);
        this.emit({ type: 'net.message', from: s.id, message });
        this.teardown(s, `left: ${message.reason}`);
        return;
      default:
        this.emit({ type: 'net.message', from: s.id, message });
    }
  }

  private refuse(s: Session, check: HelloCheck & { readonly ok: false }): void {
    s.log.warn({ code: check.code }, `refusing peer: ${check.reason}`);
    void this.closeSession(s, `refused: ${check.reason}`, `refused: ${check.reason}`);
  }

  private admit(s: Session, hello: HelloMessage, welcome?: WelcomeMessage): void {
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    s.state = 'admitted';
    s.reported = true;
    if (s.conn.dialer === 'remote') {
      const ours = this.ourHello(s);
      if (ours !== null) this.write(s, ours);
    }
    // Right after our hello, before anything the node sends: the joiner admits us only with it.
    if (welcome !== undefined) this.write(s, welcome);
    // The transport's verdict: streams of this connection that arrived early, and all later ones, are served.
    this.endpoint.admit(s.conn);
    const direct = s.conn.isDirect();
    s.log.info({ direct, role: hello.role, ...(welcome !== undefined ? { byInvite: true } : {}) }, welcome !== undefined ? 'peer admitted by an expiring invite; sent it the mesh secret' : 'peer admitted');
    this.emit({ type: 'net.peer.connected', id: s.id, direct });
    this.emit({ type: 'net.message', from: s.id, message: hello });
  }

  /** A joiner's hello presenting an expiring invite: checked with the secret we hold, answered with a welcome. */
  private onInviteHello(s: Session, hello: HelloMessage & { readonly invite: NonNullable<HelloMessage['invite']> }): void {
    if (s.conn.dialer !== 'remote') {
      void this.fail(s, 'an invite in an answering hello (a joiner presents its invite only when it dials)');
      return;
    }
    if (this.secret === null || this.meshId === null) {
      return this.refuse(s, { ok: false, code: 'INVITE_INVITER', reason: `node ${short(this.id)} holds no mesh secret to check an invite with` });
    }
    const check = checkInviteHello(hello, { meshId: this.meshId, secret: this.secret }, this.id, s.id, this.now(), this.init.protocolVersion);
    if (!check.ok) return this.refuse(s, check);
    s.log.info({ expiresAt: new Date(check.invite.expiresAt).toISOString() }, 'the peer joins with a valid expiring invite of ours');
    this.admit(s, hello, { type: 'welcome', meshId: this.meshId, secret: this.secret });
  }

  /** The joiner's side: the inviter's welcome; its secret must mint the invite's key and prove the inviter's hello. */
  private onWelcomeMessage(s: Session, welcome: WelcomeMessage): void {
    const invite = s.invite;
    const hello = s.pendingHello;
    if (invite === undefined || hello === undefined) {
      void this.fail(s, 'an unexpected welcome (this node presented no invite to this peer)');
      return;
    }
    if (welcome.meshId !== invite.meshId) {
      void this.fail(s, `the welcome is for mesh ${welcome.meshId.slice(0, 8)}, but the invite for ${invite.meshId.slice(0, 8)}`);
      return;
    }
    if (!inviteKeyMatches(invite, welcome.secret) || !verifyHelloProof(welcome.secret, s.id, this.id, hello.proof)) {
      void this.fail(s, 'the welcome\'s mesh secret does not match the invite (or the inviter\'s hello): not admitted');
      return;
    }
    s.pendingHello = undefined;
    if (this.secret === null) {
      this.secret = welcome.secret;
      s.log.info({ meshId: welcome.meshId }, `admitted to mesh ${welcome.meshId.slice(0, 8)} by an expiring invite: this node now holds the mesh secret`);
      try {
        this.onWelcome({ meshId: welcome.meshId, secret: welcome.secret });
      } catch (err) {
        this.log.error({ err: firstLine(err) }, 'the welcome handler threw');
      }
    }
    this.admit(s, hello);
  }

  /** A protocol violation: tell the peer why (so both logs say it), then close. */
  private async fail(s: Session, reason: string): Promise<void> {
    if (s.state !== 'handshaking' && s.state !== 'admitted') return;
    s.log.warn({ reason }, `closing peer: ${reason}`);
    await this.closeSession(s, reason, reason);
  }

  private async closeSession(s: Session, eventReason: string, leavingReason: string): Promise<void> {
    if (s.state !== 'handshaking' && s.state !== 'admitted') return;
    if (s.state === 'handshaking') this.endpoint.refuse(s.conn, eventReason);
    s.state = 'closing';
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    // Report at once: the node must not keep sending to a peer on its way out.
    this.report(s, eventReason);
    if (s.stream) {
      const stream = s.stream;
      this.enqueue(s, encodeFrame({ type: 'leaving', reason: leavingReason.slice(0, 500) }), true);
      const linger = this.init.closeLingerMs;
      await withDeadline(
        (async () => {
          await s.out.drained();
          await stream.finish();
        })(),
        linger,
      );
      // The peer hangs up when it reads `leaving`: wait for that (bounded) so the tail is not cut off.
      await withDeadline(s.conn.closed, linger);
    }
    this.teardown(s, eventReason);
  }

  /** Final cleanup; idempotent. Reports the end to the node if it knew the peer and has not heard yet. */
  private teardown(s: Session, reason: string): void {
    if (s.state === 'closed') return;
    if (s.state === 'handshaking') this.endpoint.refuse(s.conn, reason);
    s.state = 'closed';
    s.markDone();
    this.retired.add(s.conn);
    if (s.helloTimer) clearTimeout(s.helloTimer);
    s.helloTimer = null;
    s.out.clear();
    if (this.sessions.get(s.id) === s) this.sessions.delete(s.id);
    try {
      if (!s.conn.isClosed) s.conn.close(reason.slice(0, 200));
    } catch {
      // already closed
    }
    this.report(s, reason);
  }

  private report(s: Session, reason: string): void {
    if (!s.reported) return;
    s.reported = false;
    if (this.running) this.emit({ type: 'net.peer.disconnected', id: s.id, reason });
  }

  // ---- writing ----

  private write(s: Session, message: MeshMessage): void {
    let frame: Uint8Array;
    try {
      frame = encodeFrame(message, { maxFrameBytes: this.init.maxFrameBytes });
    } catch (err) {
      s.log.error({ err: firstLine(err), type: message.type }, 'message could not be encoded; dropped');
      return;
    }
    this.enqueue(s, frame, false);
  }

  private enqueue(s: Session, frame: Uint8Array, closing: boolean): void {
    if (s.state === 'closed' || (s.state === 'closing' && !closing)) return;
    if (!s.out.push(frame)) void this.fail(s, `peer is not reading: over ${this.init.maxQueuedBytes} bytes queued`);
  }

  private peerLog(id: EndpointId): Logger {
    return this.log.child({ peer: short(id) });
  }
}

const short = (id: string): string => id.slice(0, 10);

function logLeaving(log: Logger, reason: string): void {
  if (reason.startsWith('refused')) log.warn({ reason }, `peer refused the connection: ${reason}`);
  else log.info({ reason }, `peer is leaving: ${reason}`);
}

async function withDeadline(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p.catch(() => {}), new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}
