// The network layer of one node: the NetworkCommand/NetworkEvent face over the parts in this room.
// It accepts and dials connections (connections.ts), admits peers by their hello (handshake.ts), turns
// control-stream frames into NetworkEvents (control-stream.ts) and NetworkCommands into frames (peer-table.ts).
// Admission is also the transport's verdict (MeshEndpoint.admit/refuse): until a connection's hello is
// verified, none of its streams but the control stream reaches a handler (rpc, http, direct tunnels included).
// A bad peer is closed with a logged reason; nothing it sends can throw out of here or disturb the other peers.
import type { Logger } from 'pino';
import { PROTOCOL_VERSION, type EndpointId } from '../../machines/mesh-types.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from '../../machines/protocol.ts';
import type { HelloFacts } from '../wire/mesh-auth.ts';
import type { ExpiringInvite } from '../wire/invite-token.ts';
import { ed25519PrivateKey } from '../wire/announcement-signature.ts';
import type { MeshKey } from '../wire/rekey.ts';
import { firstLine, type MeshEndpoint } from '../transport/transport.ts';
import { PeerTable, short } from './peer-table.ts';
import { Handshake } from './handshake.ts';
import { ControlStreams } from './control-stream.ts';
import { Connections } from './connections.ts';
import { Keyring } from './keyring.ts';
import { Rekeying, type RotationResult } from './rekeying.ts';

export interface MeshNetworkInit {
  /**
   * The mesh secret from the invite token, the mesh file, or created by the first node; null for a node that
   * joins with expiring invites only, until its inviter's `welcome` brings the secret.
   */
  readonly secret: Uint8Array | null;
  /** Where `secret` stands in the mesh's rotations, and who is removed (the mesh file keeps them); default: epoch 0, nobody. */
  readonly key?: Omit<MeshKey, 'secret'>;
  /** The mesh's id: without it this node neither admits by expiring invites nor takes a welcome. */
  readonly meshId?: string;
  /** The expiring invites this node joins with while it holds no secret: each is shown only to its inviter. */
  readonly invites?: readonly ExpiringInvite[];
  /** Called once when a welcome brought the mesh secret (the node saves it in its mesh file). */
  readonly onWelcome?: (mesh: { readonly meshId: string } & MeshKey) => void;
  /** Called when a rotation (ours or a member's) changed the mesh secret (the node saves it in its mesh file). */
  readonly onRekey?: (mesh: { readonly meshId: string } & MeshKey) => void;
  /** This endpoint's 32-byte secret key, to sign the rotations this node makes; without it, `rotate` refuses. */
  readonly signingKey?: Uint8Array;
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

type Tunables = Omit<MeshNetworkInit, 'secret' | 'key' | 'meshId' | 'invites' | 'onWelcome' | 'onRekey' | 'signingKey' | 'now'>;

export class MeshNetwork {
  readonly id: EndpointId;
  private readonly endpoint: MeshEndpoint;
  private readonly log: Logger;
  /** The sessions, their writes and their ends; shared by the parts below. */
  private readonly table: PeerTable;
  private readonly connections: Connections;
  private readonly keys: Keyring;
  private readonly rekeying: Rekeying;
  private stopped = false;

  constructor(init: MeshNetworkInit, components: MeshNetworkComponents) {
    const { secret, key, meshId, invites, onWelcome, onRekey, signingKey, now, ...tunables } = init;
    const clock = now ?? Date.now;
    const tuned: Required<Tunables> = { ...DEFAULTS, protocolVersion: PROTOCOL_VERSION, ...tunables };
    this.endpoint = components.endpoint;
    this.id = components.endpoint.id;
    this.log = components.logger;
    this.table = new PeerTable(this.endpoint, this.log, tuned);
    this.keys = new Keyring(secret === null ? null : { secret, keyEpoch: key?.keyEpoch ?? 0, issuer: key?.issuer ?? null, removed: key?.removed ?? [] }, clock);
    this.rekeying = new Rekeying(this.table, this.keys, this.id, meshId ?? null, signingKey === undefined ? null : ed25519PrivateKey(signingKey), onRekey ?? (() => {}), clock);
    const handshake = new Handshake(
      {
        keys: this.keys,
        meshId: meshId ?? null,
        invites: new Map((invites ?? []).map((i) => [i.inviter, i])),
        onWelcome: onWelcome ?? (() => {}),
        now: clock,
        hello: tuned.hello,
        protocolVersion: tuned.protocolVersion,
      },
      this.id,
      this.table,
      this.endpoint,
    );
    this.connections = new Connections(this.id, this.endpoint, this.table, new ControlStreams(this.table, handshake, this.rekeying, this.keys), tuned);
  }

  /** Starts accepting; every event from now on goes to `onEvent`. A MeshNetwork starts once. */
  start(onEvent: (event: NetworkEvent) => void): void {
    if (this.table.running || this.stopped) return;
    this.table.running = true;
    this.table.emit = (event) => {
      try {
        onEvent(event);
      } catch (err) {
        this.log.error({ err, event: event.type }, 'network event handler threw');
      }
    };
    this.endpoint.handle('control', (stream, conn) => this.connections.onControlStream(stream, conn));
    void this.connections.acceptLoop();
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
    return [...this.table.sessions.values()].filter((s) => s.state === 'admitted').map((s) => s.id);
  }

  /** Connects and handshakes; the outcome arrives as net.peer.connected or net.peer.disconnected. A removed member is never dialed. */
  dial(id: EndpointId, addrs: readonly string[]): Promise<void> {
    if (this.keys.isRemoved(id)) {
      this.log.debug({ peer: short(id) }, 'not dialing a member removed from the mesh');
      this.table.emit({ type: 'net.peers.removed', ids: [id] });
      return Promise.resolve();
    }
    return this.connections.dial(id, addrs);
  }

  /**
   * Rotates the mesh secret across the live members, removing `remove` (their connections close, and every
   * member refuses them from now on). Throws RotationError when this node cannot (no secret, no signing key).
   */
  rotate(remove: readonly EndpointId[] = []): RotationResult {
    return this.rekeying.rotate(remove);
  }

  /** The key epoch and removed members as they stand (for status). */
  keyState(): { readonly keyEpoch: number; readonly removed: readonly EndpointId[] } | null {
    const k = this.keys.current;
    return k === null ? null : { keyEpoch: k.keyEpoch, removed: k.removed };
  }

  /** Queues a message to an admitted peer (dropped otherwise). Sending `leaving` closes the connection after it. */
  send(to: EndpointId, message: MeshMessage): void {
    const s = this.table.sessions.get(to);
    if (!s || s.state !== 'admitted') {
      this.log.debug({ peer: short(to), type: message.type }, 'send to a peer that is not connected: dropped');
      return;
    }
    if (message.type === 'leaving') {
      // The peer drops us when it reads it; closing after it makes the end the same on both sides.
      void this.close(to, message.reason);
      return;
    }
    this.table.write(s, message);
  }

  /** Sends `leaving`, lets it arrive, then closes. Resolves once the connection is closed. */
  async close(id: EndpointId, reason: string): Promise<void> {
    const s = this.table.sessions.get(id);
    if (!s || s.state === 'closing' || s.state === 'closed') return;
    s.log.info({ reason }, 'closing connection');
    await this.table.closeSession(s, `closed: ${reason}`, reason);
  }

  /** Closes every peer (each gets `leaving`) and stops accepting. The endpoint itself stays with its owner. */
  async stop(reason = 'node stopping'): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (!this.table.running) return;
    this.endpoint.unhandle('control');
    await Promise.all([...this.table.sessions.values()].map((s) => this.table.closeSession(s, `closed: ${reason}`, reason)));
    this.table.running = false;
    this.table.emit = () => {};
  }
}
