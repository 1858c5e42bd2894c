// elect(view) -> Plan: who hosts, which workers serve which share of the layers, or why nothing starts.
// Pure, total and deterministic over gossiped facts only, so every node with the same view gets the same plan.
import { connectedPart, mutuallyConnected } from './gossip.ts';
import { fnv1a64 } from './hash.ts';
import { describeServe } from './kv-cache.ts';
import type { Announcement, EndpointId, ModelIdentity, Plan, PlanStage, View } from './mesh-types.ts';
import { formatSize } from './units.ts';

/** The set must hold this much more VRAM than the model file (compute buffers), plus the host's KV cache. */
export const HEADROOM = 1.1;

/**
 * The VRAM a plan for `modelBytes` must hold: 1.1 x, in integer arithmetic, so that a node with exactly
 * 1.1 x counts (in floating point 1.1 * 3e9 is 3300000000.0000005) and every node computes the same number.
 */
export function requiredBytes(modelBytes: number): number {
  return Math.ceil((modelBytes * 11) / 10);
}

/**
 * What a plan hosted by `host` must hold: 1.1 x the model bytes plus the KV cache of the host's announced
 * settings (`kv`: the host's llama-server allocates it, src/machines/kv-cache.ts). A missing or nonsense
 * `kv` counts 0 (an election never throws on bad gossip).
 */
export function planNeed(host: Announcement & { model: ModelIdentity }): { bytes: number; weights: number; kv: number } {
  const weights = requiredBytes(host.model.bytes);
  const kv = host.kv !== undefined && isSize(host.kv.bytes) ? host.kv.bytes : 0;
  return { bytes: weights + kv, weights, kv };
}

/**
 * The model fingerprint this node elects over. A node holding a model elects over its own model: it can
 * only ever serve that one. A lite client (role `client`, or no model) follows the fingerprint that the
 * most candidates in its part hold (ties by the smaller fingerprint string), so it joins the biggest
 * group it can reach; null when nobody in reach holds a model.
 */
export function electionFingerprint(view: View): string | null {
  const self = view.announcements[view.self];
  if (self === undefined) return null;
  if (self.role !== 'client' && self.model !== null) return self.model.fingerprint;
  const counts = new Map<string, number>();
  for (const a of connectedPart(view)) {
    if (a.model !== null && a.role !== 'client' && a.version === self.version) {
      counts.set(a.model.fingerprint, (counts.get(a.model.fingerprint) ?? 0) + 1);
    }
  }
  let best: string | null = null;
  let bestCount = 0;
  for (const [fp, n] of counts) {
    if (n > bestCount || (n === bestCount && best !== null && fp < best)) {
      best = fp;
      bestCount = n;
    }
  }
  return best;
}

/**
 * The nodes that may take a stage of a plan for `fingerprint`: in self's connected part, holding that
 * model, not a lite client, on self's protocol version, and with sane numbers (bad gossip never crashes
 * an election, it just does not count). Sorted by id.
 */
export function candidatesFor(view: View, fingerprint: string): Announcement[] {
  const version = view.announcements[view.self]?.version;
  return connectedPart(view).filter(
    (a) =>
      a.role !== 'client' &&
      a.model !== null &&
      a.model.fingerprint === fingerprint &&
      a.version === version &&
      isSize(a.vramBytes) &&
      isSize(a.model.bytes),
  );
}

/** Elects over `connectedPart(view)` by the rules of ARCHITECTURE.md (see the steps below). */
export function elect(view: View): Plan {
  const fingerprint = electionFingerprint(view);
  if (fingerprint === null) {
    // No counts of connected nodes in here: a lite client joining must not change this plan's id.
    return waiting(null, 'no node in reach holds a model: start a node with --model, or join one that has it');
  }
  const candidates = candidatesFor(view, fingerprint);
  const hostable = candidates.filter((a) => a.role !== 'worker');
  if (hostable.length === 0) {
    return waiting(
      fingerprint,
      candidates.length === 0
        ? `no node in reach can serve model ${fingerprint}`
        : `the ${candidates.length} node(s) holding model ${modelName(candidates)} are all --role worker; one must be allowed to host`,
    );
  }

  // Host: a node that asked to host wins over `auto`; then the most VRAM; then the smaller id.
  const preferred = hostable.some((a) => a.role === 'host') ? hostable.filter((a) => a.role === 'host') : hostable;
  const host = [...preferred].sort(byVramThenId)[0] as Announcement & { model: ModelIdentity };
  const { bytes: need, kv } = planNeed(host);

  // Workers: only as many as needed (each stage costs a round trip per token), biggest first, and only
  // among nodes the host itself is directly connected to, since the host's llama-server dials them.
  const workers: Announcement[] = [];
  let total = host.vramBytes;
  if (total < need) {
    const reachable = candidates
      .filter((a) => a.id !== host.id && mutuallyConnected(view, host.id, a.id))
      .sort(byVramThenId);
    for (const w of reachable) {
      if (total >= need) break;
      workers.push(w);
      total += w.vramBytes;
    }
  }
  if (total < need) {
    return waiting(
      fingerprint,
      `need ${formatSize(need)} of VRAM for ${host.model.name} (${HEADROOM} x ${formatSize(host.model.bytes)}` +
        `${host.kv !== undefined && kv > 0 ? ` + ${formatSize(kv)} KV cache: ${describeServe(host.kv)}` : ''}), ` +
        `the mesh has ${formatSize(total)} (host ${host.name} and ${workers.length} directly connected worker(s))`,
    );
  }

  // Shares proportional to VRAM; the host's own rpc-server goes last (it then holds the output layer,
  // so logits stay local) and takes the remainder, so the shares sum to exactly 1.
  const stages: PlanStage[] = workers.map((w) => ({ id: w.id, share: w.vramBytes / total }));
  const workerSum = stages.reduce((sum, s) => sum + s.share, 0);
  stages.push({ id: host.id, share: 1 - workerSum });

  return {
    kind: 'ready',
    id: readyPlanId(fingerprint, host.id, stages),
    host: host.id,
    stages,
    model: host.model,
  };
}

/**
 * The identity of a ready plan: host, stages in order, split and model, and nothing else (not seq, not
 * `serving`, not addresses), so a change that cannot change what runs never changes the id.
 */
export function readyPlanId(fingerprint: string, host: EndpointId, stages: readonly PlanStage[]): string {
  return fnv1a64(JSON.stringify(['ready', fingerprint, host, stages.map((s) => [s.id, s.share])]));
}

/** The plan's stage ids in `--rpc` order (remote workers, then the host). */
export function planMembers(plan: Plan): EndpointId[] {
  return plan.kind === 'ready' ? plan.stages.map((s) => s.id) : [];
}

function waiting(fingerprint: string | null, reason: string): Plan {
  return { kind: 'waiting', id: fnv1a64(JSON.stringify(['waiting', fingerprint, reason])), reason };
}

function byVramThenId(a: Announcement, b: Announcement): number {
  if (a.vramBytes !== b.vramBytes) return b.vramBytes - a.vramBytes;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

export function isSize(n: number): boolean {
  return Number.isFinite(n) && n >= 0;
}

function modelName(candidates: readonly Announcement[]): string {
  return candidates[0]?.model?.name ?? 'unknown';
}
