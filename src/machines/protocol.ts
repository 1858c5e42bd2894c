// The control-stream messages between two peers, as the machines see them (already decoded and validated).
// src/io/wire/messages.ts validates raw msgpack values into these; src/io/wire/frame-codec.ts frames them.
import type { Announcement, EndpointId, ModelIdentity, RolePreference } from './mesh-types.ts';

/** First message each side sends on the control stream. */
export interface HelloMessage {
  readonly type: 'hello';
  readonly version: number;
  readonly id: EndpointId;
  readonly role: RolePreference;
  readonly vramBytes: number;
  readonly model: ModelIdentity | null;
  /** HMAC of the mesh secret over (protocol, sender id, receiver id): proves the secret without sending it.
   * With `invite`: the same HMAC keyed by the invite's invite key instead (the joiner holds no secret yet). */
  readonly proof: Uint8Array;
  /** An expiring invite (`mi2`) the sender joins with: its signed bytes and the inviter's signature. */
  readonly invite?: HelloInvite;
}

/** The part of an `mi2` token a joiner presents in its hello (the admitting node parses and checks it). */
export interface HelloInvite {
  readonly signed: Uint8Array;
  readonly signature: Uint8Array;
}

/** Sent by the inviter to a peer it admitted by an expiring invite, right after its hello: the real secret. */
export interface WelcomeMessage {
  readonly type: 'welcome';
  readonly meshId: string;
  readonly secret: Uint8Array;
  /** The secret's rotation count (0 before any rotation; absent = 0), so an older rekey cannot roll it back. */
  readonly keyEpoch?: number;
  /** Members removed from the mesh so far: the joiner refuses them too. */
  readonly removed?: readonly EndpointId[];
}

/**
 * A new mesh secret (src/io/wire/rekey.ts): made by one member (`issuer`, who signs it with its endpoint key),
 * sent over the admitted, encrypted control streams to every member but the removed ones, and relayed verbatim.
 * A member takes it only when `keyEpoch` (then `issuer`) is newer than the one it holds.
 */
export interface RekeyMessage {
  readonly type: 'rekey';
  readonly meshId: string;
  readonly keyEpoch: number;
  readonly secret: Uint8Array;
  /** Every member removed so far (cumulative): refused at the hello, never dialed, their gossip dropped. */
  readonly removed: readonly EndpointId[];
  readonly issuer: EndpointId;
  /** Milliseconds since the epoch, by the issuer's clock (logged; not a freshness check). */
  readonly issuedAt: number;
  readonly sig: Uint8Array;
}

/** The announcements the sender knows (its own first). */
export interface GossipMessage {
  readonly type: 'gossip';
  readonly announcements: readonly Announcement[];
}

export interface HeartbeatMessage {
  readonly type: 'heartbeat';
  readonly n: number;
}

export interface HeartbeatAckMessage {
  readonly type: 'heartbeat-ack';
  readonly n: number;
}

/** Sent before a graceful close, so peers drop the sender at once instead of waiting for heartbeats. */
export interface LeavingMessage {
  readonly type: 'leaving';
  readonly reason: string;
}

/** Hand-off: a worker tells the host of `planId` that its rpc-server is free for it. */
export interface RpcReadyMessage {
  readonly type: 'rpc-ready';
  readonly planId: string;
}

export type MeshMessage =
  | HelloMessage
  | GossipMessage
  | HeartbeatMessage
  | HeartbeatAckMessage
  | LeavingMessage
  | RpcReadyMessage
  | WelcomeMessage
  | RekeyMessage;

export type MeshMessageType = MeshMessage['type'];

/**
 * The contract between the node machine and the network actor (src/actors/mesh-network.actor.ts).
 * The network reports admitted peers (hello verified) and messages; the node commands dials and sends.
 */
export type NetworkEvent =
  | { readonly type: 'net.peer.connected'; readonly id: EndpointId; readonly direct: boolean }
  | { readonly type: 'net.peer.disconnected'; readonly id: EndpointId; readonly reason: string }
  | { readonly type: 'net.message'; readonly from: EndpointId; readonly message: MeshMessage }
  /** Members removed by a rotation of the mesh secret: the node forgets them; the network refuses them from now on. */
  | { readonly type: 'net.peers.removed'; readonly ids: readonly EndpointId[] };

export type NetworkCommand =
  | { readonly type: 'net.dial'; readonly id: EndpointId; readonly addrs: readonly string[] }
  | { readonly type: 'net.send'; readonly to: EndpointId; readonly message: MeshMessage }
  | { readonly type: 'net.close'; readonly id: EndpointId; readonly reason: string };
