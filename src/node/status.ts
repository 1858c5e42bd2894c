// What GET /api/status answers, read from the node actor's snapshot and the tunnels' figures; and what the
// inspector may see of a context or event.
import type { Actor } from 'xstate';
import type { TunnelsStatus } from '../actors/tunnels.actor.ts';
import type { WeightsOverWire } from '../io/llama/llama-server-output.ts';
import type { RpcTrafficSnapshot } from '../io/llama/rpc-traffic.ts';
import type { EndpointId, ModelIdentity } from '../machines/mesh-types.ts';
import { meshNodeView, type MeshNodeView } from '../machines/mesh-events.ts';
import { runningRole, type NodeContext, type nodeMachine } from '../machines/node.machine.ts';
import type { LifecycleBackoff } from '../machines/process-lifecycle.machine.ts';

export interface NodeStatus {
  readonly node: {
    readonly id: EndpointId;
    readonly name: string;
    readonly rolePreference: string;
    readonly state: unknown;
    readonly role: string;
    readonly model: ModelIdentity | null;
    readonly vramBytes: number;
    readonly meshId: string;
    /** How many rotations the mesh secret has been through, and how many members are removed (the secret itself never shows). */
    readonly keyEpoch: number | null;
    readonly removedMembers: number;
    readonly stopReason: string | null;
  };
  readonly plan: NodeContext['running'];
  readonly electedPlan: NodeContext['plan'];
  readonly view: readonly MeshNodeView[];
  readonly links: readonly EndpointId[];
  readonly machines: {
    readonly node: unknown;
    readonly election: unknown;
    readonly rpcServer: unknown;
    readonly llamaServer: unknown;
    readonly peers: Readonly<Record<string, unknown>>;
  };
  /**
   * Each process: `crashes` in a row (of the same plan, for llama-server; 0 once it stayed ready 60 s),
   * `lastCrash` (the latest crash's reason, kept), `backoff` while a restart waits ({reason, crashes, delayMs,
   * nextAttemptAt} in epoch ms; null otherwise): docs/node.md, "Liveness and back-off".
   */
  readonly processes: {
    readonly rpcServer: { readonly state: string; readonly port: number | null } & ProcessHealth;
    readonly llamaServer: { readonly state: string; readonly port: number | null; readonly generation: number } & ProcessHealth;
  };
  /** Tunnel connections both ways, each with its data path (direct TLS or QUIC) and bytes; the data port. */
  readonly tunnels: TunnelsStatus;
  /** Host with countRpc: RPC traffic to each worker through its tunnel, cumulated over generations. */
  readonly rpcTraffic: Readonly<Record<string, RpcTrafficSnapshot>>;
  /**
   * Host: weights the current llama-server sent as bytes to a stage's rpc-server because its GGUF refused
   * them (patch 0001: another model file there), by stage id; {} when every weight loaded from the GGUFs.
   * Small weights (norms, under 64 KiB) always go as bytes by design and are not counted.
   */
  readonly weightsOverWire: Readonly<Record<EndpointId, WeightsOverWire>>;
}

export interface ProcessHealth {
  readonly crashes: number;
  readonly lastCrash: string | null;
  readonly backoff: LifecycleBackoff | null;
}

export function nameOf(c: NodeContext, id: EndpointId): string {
  return c.view.announcements[id]?.name ?? id.slice(0, 10);
}

type Snapshotted = { getSnapshot(): { value?: unknown; status?: string } } | undefined;
const valueOf = (ref: Snapshotted): unknown => ref?.getSnapshot().value ?? null;
/** A process lifecycle machine's crash count, last crash and back-off (a lite client has none: zeros). */
function healthOf(ref: Snapshotted): ProcessHealth {
  const c = (ref?.getSnapshot() as { context?: Partial<ProcessHealth> } | undefined)?.context;
  return { crashes: c?.crashes ?? 0, lastCrash: c?.lastCrash ?? null, backoff: c?.backoff ?? null };
}

export function nodeStatus(
  actor: Actor<typeof nodeMachine>,
  extra: {
    meshId: string;
    key: { readonly keyEpoch: number; readonly removed: readonly EndpointId[] } | null;
    tunnels: TunnelsStatus;
    rpcTraffic: Record<string, RpcTrafficSnapshot>;
    weightsOverWire?: Readonly<Record<EndpointId, WeightsOverWire>>;
  },
): NodeStatus {
  const snap = actor.getSnapshot();
  const c = snap.context;
  const children = snap.children as Record<string, Snapshotted>;
  const peers: Record<string, unknown> = {};
  for (const [id, ref] of Object.entries(c.peers)) peers[id] = valueOf(ref as Snapshotted);
  return {
    node: {
      id: c.self.id,
      name: c.self.name,
      rolePreference: c.self.role,
      state: snap.value,
      role: runningRole(c),
      model: c.self.model,
      vramBytes: c.self.vramBytes,
      meshId: extra.meshId,
      keyEpoch: extra.key?.keyEpoch ?? null,
      removedMembers: extra.key?.removed.length ?? 0,
      stopReason: c.stopReason,
    },
    plan: c.running,
    electedPlan: c.plan,
    view: Object.values(c.view.announcements).map(meshNodeView),
    links: c.links,
    machines: {
      node: snap.value,
      election: valueOf(children['election']),
      rpcServer: valueOf(children['rpcServer']),
      llamaServer: valueOf(children['llamaServer']),
      peers,
    },
    processes: {
      rpcServer: { state: c.rpc, port: c.rpcPort, ...healthOf(children['rpcServer']) },
      llamaServer: { state: c.llama, port: c.llamaPort, generation: c.generation, ...healthOf(children['llamaServer']) },
    },
    tunnels: extra.tunnels,
    rpcTraffic: extra.rpcTraffic,
    weightsOverWire: extra.weightsOverWire ?? {},
  };
}

/**
 * What the inspector may see of a context or event: actor refs become their ids (a ref drags the whole
 * actor system into the serialiser), byte arrays their length.
 */
export function sanitizeForInspector<T>(value: T): T {
  return sanitize(value, 0) as T;
}

function sanitize(v: unknown, depth: number): unknown {
  if (v === null || typeof v !== 'object') return v;
  if (depth > 6) return '…';
  if (v instanceof Uint8Array) return `<${v.length} bytes>`;
  const o = v as Record<string, unknown>;
  if (typeof o['send'] === 'function' && typeof o['getSnapshot'] === 'function') return `<actor ${String(o['id'] ?? '')}>`;
  if (Array.isArray(v)) return v.map((x) => sanitize(x, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(o)) out[k] = sanitize(x, depth + 1);
  return out;
}
