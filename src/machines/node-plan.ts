// Pure helpers the node machine (and whoever reads its snapshot) uses to ask what a plan means for one node.
import type { EndpointId, Plan } from './mesh-types.ts';

/**
 * What a node does under a plan: `host` runs llama-server and its own rpc-server; `worker` runs an
 * rpc-server for the host; `standby` runs nothing (not needed, or a lite client); `waiting` runs nothing
 * because the plan itself says why nothing can start.
 */
export type NodeRole = 'host' | 'worker' | 'standby' | 'waiting';

export function roleIn(plan: Plan | null, self: EndpointId): NodeRole {
  if (plan === null || plan.kind === 'waiting') return 'waiting';
  if (plan.host === self) return 'host';
  return plan.stages.some((s) => s.id === self) ? 'worker' : 'standby';
}

/** The remote stages of a ready plan: the workers whose rpc-ready the host waits for. */
export function remoteWorkers(plan: Plan | null): EndpointId[] {
  if (plan === null || plan.kind !== 'ready') return [];
  return plan.stages.filter((s) => s.id !== plan.host).map((s) => s.id);
}

/** Whether the node must run an rpc-server under this plan. */
export function needsRpcServer(role: NodeRole): boolean {
  return role === 'host' || role === 'worker';
}

/** Inserts into a sorted id list (no duplicates). */
export function withId(ids: readonly EndpointId[], id: EndpointId): EndpointId[] {
  return ids.includes(id) ? [...ids] : [...ids, id].sort();
}

export function withoutId(ids: readonly EndpointId[], id: EndpointId): EndpointId[] {
  return ids.filter((x) => x !== id);
}

export function sameIds(a: readonly EndpointId[], b: readonly EndpointId[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
