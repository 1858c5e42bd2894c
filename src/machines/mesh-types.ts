// The vocabulary every layer shares: who a node is, what it gossips, and the plan an election yields.
// Pure types (and tiny pure helpers): no I/O, no clock. src/io and src/actors import these, never the reverse.
import type { KvSizing } from './kv-cache.ts';

/** An iroh endpoint id (hex of the node's public key). Branded so that plain strings do not slip in. */
export type EndpointId = string & { readonly __endpointId: true };
export const asEndpointId = (s: string): EndpointId => s as EndpointId;

/** What a node is willing to be. `auto` may host or work; `worker` never hosts; `client` holds no model. */
export type RolePreference = 'auto' | 'host' | 'worker' | 'client';

/** Identity of a GGUF model: two nodes serve together only when the fingerprints match. */
export interface ModelIdentity {
  readonly name: string;
  readonly bytes: number;
  /** Hash of the GGUF header and the file size (src/io/gguf). */
  readonly fingerprint: string;
}

/**
 * The mesh protocol version carried in hello and gossip; a mismatch is refused at the hello (the refusal names
 * both versions and the node to upgrade). 2: announcements are signed by their owners (`sig`). 3: they carry
 * the KV cache sizing of the plans a node would host (`kv`), which the election counts.
 */
export const PROTOCOL_VERSION = 3;

/**
 * One node's announcement of itself: the only facts an election may use.
 * `epoch` is fixed for one run of the node (chosen by the composition root), `seq` rises with every change;
 * a merge keeps the announcement with the greatest (epoch, seq).
 */
export interface Announcement {
  readonly id: EndpointId;
  readonly epoch: number;
  readonly seq: number;
  readonly name: string;
  readonly role: RolePreference;
  readonly vramBytes: number;
  readonly model: ModelIdentity | null;
  readonly version: number;
  /** Whether this node currently serves (its rpc-server is up, and llama-server if it hosts). */
  readonly serving: boolean;
  /** Where this node can be dialed ("ip:port" strings); used to connect, never by the election. */
  readonly addrs: readonly string[];
  /** Peers this node holds a direct (not relayed) connection to, sorted. Only mutual edges count. */
  readonly connectedTo: readonly EndpointId[];
  /**
   * The serving settings of the plans this node would host (context, slots, KV cache type) and the KV cache's
   * bytes for them (src/machines/kv-cache.ts): the election adds the host's `kv.bytes` to what a plan needs.
   * Absent on a lite client (and in old tests): no KV term.
   */
  readonly kv?: KvSizing;
  /**
   * The owner's ed25519 signature (its endpoint key) over the fields above, the mesh id and a context string
   * (src/io/wire/announcement-signature.ts). Relayed verbatim; a fact about X counts only with X's valid
   * signature. Absent only on an announcement not yet signed (the node machine signs its own).
   */
  readonly sig?: Uint8Array;
}

/**
 * Signs this node's announcements and checks everyone's: the node machine gets one from the composition root
 * (crypto lives in src/io), so the machines stay pure. `sign` returns the announcement with `sig` set.
 */
export interface AnnouncementAuthority {
  sign(announcement: Announcement): Announcement;
  verify(announcement: Announcement): boolean;
}

/** What a node knows: its own id and the latest announcement of every node it has heard of. */
export interface View {
  readonly self: EndpointId;
  readonly announcements: Readonly<Record<string, Announcement>>;
}

/** One stage of a plan: a node whose rpc-server takes a share of the layers. */
export interface PlanStage {
  readonly id: EndpointId;
  /** Share of the layers, 0..1; the shares of a plan sum to 1. */
  readonly share: number;
}

export type Plan =
  | {
      readonly kind: 'ready';
      /** Hash of host, stages, split and model: equal ids mean nothing to restart. */
      readonly id: string;
      readonly host: EndpointId;
      /** In `--rpc` order: remote workers first, the host's own rpc-server last. */
      readonly stages: readonly PlanStage[];
      readonly model: ModelIdentity;
    }
  | {
      readonly kind: 'waiting';
      readonly id: string;
      /** Why nothing can start, for people: "need 12.1 GB of VRAM, the mesh has 8.0 GB". */
      readonly reason: string;
    };
