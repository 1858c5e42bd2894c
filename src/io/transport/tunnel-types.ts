// The tunnel service's public types (tunnel.ts re-exports them): its policy, options, reports, listeners and counters.
import type { Logger } from 'pino';
import type { EndpointId } from '../../machines/mesh-types.ts';
import type { TunnelDecision, TunnelKind } from '../../machines/tunnel-policy.ts';
import type { DirectPathServer } from './direct-path.ts';
import type { TunnelCodec } from './tunnel-codec.ts';
import type { StageStall, StageWatchInit } from './tunnel-watch.ts';
import type { MeshEndpoint } from './transport.ts';

/**
 * Where an incoming tunnel from `remoteId` goes, or why it is refused (logged on both sides). `planId`: the
 * plan id the opener sent with an rpc stream or rpc offer (null: none; always null for http).
 */
export type TunnelPolicy = (remoteId: EndpointId, kind: TunnelKind, planId: string | null) => TunnelDecision;

export interface TunnelInit {
  readonly allow: TunnelPolicy;
  /** How tunnels that this node opens carry bytes; default `deflate`. Incoming ones use the opener's choice. */
  readonly codec?: TunnelCodec;
  /** TCP bytes held while a QUIC write is pending before the socket is paused. Default 1 MiB. */
  readonly highWaterBytes?: number;
  /** How long connecting to a local target may take. Default 5 s. */
  readonly connectTimeoutMs?: number;
  /** Send each llama.cpp RPC message as one QUIC write (RpcBoundaryScanner). Default true. */
  readonly batchRpc?: boolean;
  /**
   * `auto`: each tunnel connection this node opens tries the direct TCP + TLS path first and falls back to an
   * iroh stream; `quic`: iroh streams only. Default `quic` (the composition passes the user's choice).
   */
  readonly dataPath?: 'auto' | 'quic';
  /** How long the direct attempt may take before the fallback. Default 1 s. */
  readonly directTimeoutMs?: number;
  /** How long an incoming stream may take to send its header (codec, plan id) before it is reset. Default 5 s. */
  readonly headerTimeoutMs?: number;
  /** The bounds of the watch over opened rpc tunnels (tunnel-watch.ts); it runs when `report.stall` is given. */
  readonly stallWatch?: StageWatchInit;
}

/** What the tunnels tell their owner about the peers behind them. */
export interface TunnelReports {
  /** An opened rpc tunnel owes a reply and has heard nothing for the bound: the stage is hung. */
  stall?(s: StageStall): void;
  /**
   * A tunnel of ours ended from the far side: `quic`, its QUIC connection failed; `direct`, the direct data
   * connection was reset or ended by the peer's side (anyone on the path can do that: weak evidence).
   */
  evidence?(peer: EndpointId, path: 'quic' | 'direct', why: string): void;
}

export interface TunnelComponents {
  readonly endpoint: MeshEndpoint;
  readonly log?: Logger;
  /** This node's data port, which answers peers' direct offers; none: every offer is refused. */
  readonly direct?: DirectPathServer | null;
  readonly report?: TunnelReports;
}

/** One live tunnel connection, as /api/status shows it. */
export interface TunnelInfo {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  /** `opened`: our local client reaches the peer; `accepted`: the peer reaches our local target. */
  readonly side: 'opened' | 'accepted';
  readonly path: 'direct' | 'quic';
  /** Bytes from our local socket towards the peer, and back. */
  readonly bytesOut: number;
  readonly bytesIn: number;
}

export interface TunnelListener {
  readonly peer: EndpointId;
  readonly kind: TunnelKind;
  /** rpc: the plan id every connection of this listener carries to the peer (null: none). */
  readonly planId: string | null;
  readonly host: string;
  readonly port: number;
  close(): Promise<void>;
}

export interface TunnelStats {
  readonly pipes: number;
  readonly listeners: number;
  /** QUIC writes and bytes written (after the codec), over all pipes ever: what a message costs. */
  readonly quicWrites: number;
  readonly quicBytesOut: number;
  /** TCP bytes taken from local sockets (before the codec). */
  readonly tcpBytesIn: number;
  /** QUIC reads (chunks received). */
  readonly quicReads: number;
  /** Connections ever carried by the direct path, and those that fell back to QUIC after trying it. */
  readonly directOpened: number;
  readonly directFallbacks: number;
}
