// The plan preview: which node would get which layers, the host, what the plan must hold (1.1 x the model +
// the host's KV cache), and why each other node is left out or why the mesh waits. Pure: it explains what
// `elect` decides on a view (the product's election, never a re-implementation of its choice), and
// `withCandidate` adds the node this machine would start, for `mesh-inference plan`.
import { connectedPart, mutuallyConnected } from './gossip.ts';
import { elect, electionFingerprint, isSize, planNeed } from './election.ts';
import { describeServe, layerRanges, type KvSizing } from './kv-cache.ts';
import type { Announcement, EndpointId, ModelIdentity, Plan, View } from './mesh-types.ts';
import { formatSize } from './units.ts';

export interface PreviewStage {
  readonly id: EndpointId;
  readonly name: string;
  readonly vramBytes: number;
  readonly share: number;
  /** Repeating layers [from, to) by llama.cpp's --tensor-split rule; null when the host announced no shape. */
  readonly layers: readonly [number, number] | null;
  /** This stage's part of the KV cache (its layers' share); 0 without the host's KV sizing. */
  readonly kvBytes: number;
  /** The host's own rpc-server: it holds the output layer too. */
  readonly host: boolean;
}

export interface PlanPreview {
  readonly plan: Plan;
  readonly host: { readonly id: EndpointId; readonly name: string } | null;
  /** What the plan must hold, from the (would-be) host's facts; null when no node could host. */
  readonly need: { readonly bytes: number; readonly modelBytes: number; readonly weightsBytes: number; readonly kvBytes: number; readonly kv: KvSizing | null } | null;
  readonly stages: readonly PreviewStage[];
  readonly leftOut: ReadonlyArray<{ readonly id: EndpointId; readonly name: string; readonly why: string }>;
  /** The same for people, one line each (the CLI prints them; the console shows them). */
  readonly lines: readonly string[];
}

/** Explains `elect(view)`. */
export function previewPlan(view: View): PlanPreview {
  const plan = elect(view);
  const fingerprint = electionFingerprint(view);
  const all = Object.values(view.announcements);
  const nameOf = (id: EndpointId) => view.announcements[id]?.name ?? id.slice(0, 10);
  const hostA = plan.kind === 'ready' ? view.announcements[plan.host] : wouldBeHost(view, fingerprint);
  const host = hostA !== undefined && hostA.model !== null ? (hostA as Announcement & { model: ModelIdentity }) : null;
  const need = host === null ? null : (() => {
    const n = planNeed(host);
    return { bytes: n.bytes, modelBytes: host.model.bytes, weightsBytes: n.weights, kvBytes: n.kv, kv: host.kv ?? null };
  })();

  const stages: PreviewStage[] = [];
  if (plan.kind === 'ready') {
    const layers = host?.kv !== undefined && isSize(host.kv.layers) && host.kv.layers > 0 ? host.kv.layers : null;
    const ranges = layers === null ? null : layerRanges(plan.stages.map((s) => s.share), layers);
    plan.stages.forEach((s, i) => {
      const range = ranges?.[i] ?? null;
      const kvBytes = range !== null && layers !== null && need !== null ? Math.round((need.kvBytes * (range[1] - range[0])) / layers) : 0;
      stages.push({ id: s.id, name: nameOf(s.id), vramBytes: view.announcements[s.id]?.vramBytes ?? 0, share: s.share, layers: range, kvBytes, host: s.id === plan.host });
    });
  }

  const part = new Set(connectedPart(view).map((a) => a.id as string));
  const inPlan = new Set(stages.map((s) => s.id as string));
  const version = view.announcements[view.self]?.version;
  const leftOut = all
    .filter((a) => !inPlan.has(a.id))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.id < b.id ? -1 : 1))
    .map((a) => ({ id: a.id, name: a.name, why: whyLeftOut(a, { view, plan, part, fingerprint, version, host }) }));

  return { plan, host: host === null ? null : { id: host.id, name: host.name }, need, stages, leftOut, lines: lines(plan, host, need, stages, leftOut) };
}

/**
 * The view as it would be if `candidate` (the node this machine would start) joined: connected directly to
 * every node the observer `view.self` is directly connected to (it would run here, where the observer runs),
 * elected from the candidate's side. The observer itself is left out: the candidate takes its place.
 */
export function withCandidate(view: View, candidate: Announcement): View {
  const observer = view.self;
  const links = (view.announcements[observer]?.connectedTo ?? []).filter((id) => view.announcements[id]?.connectedTo.includes(observer));
  const announcements: Record<string, Announcement> = {};
  for (const a of Object.values(view.announcements)) {
    if (a.id === observer || a.id === candidate.id) continue;
    announcements[a.id] = links.includes(a.id) ? { ...a, connectedTo: [...a.connectedTo.filter((x) => x !== observer), candidate.id].sort() } : a;
  }
  announcements[candidate.id] = { ...candidate, connectedTo: [...links].sort() };
  return { self: candidate.id, announcements };
}

interface Why {
  readonly view: View;
  readonly plan: Plan;
  readonly part: ReadonlySet<string>;
  readonly fingerprint: string | null;
  readonly version: number | undefined;
  readonly host: Announcement | null;
}

function whyLeftOut(a: Announcement, w: Why): string {
  if (!w.part.has(a.id)) return 'not in reach: no chain of direct connections to it';
  if (a.role === 'client' || a.model === null) return 'a lite client (no model): it uses the mesh, it takes no layers';
  if (a.version !== w.version) return `runs mesh protocol ${a.version}, not ${w.version}: upgrade one of them`;
  if (a.model.fingerprint !== w.fingerprint) return `holds a different model (${a.model.name}, ${formatSize(a.model.bytes)})`;
  if (!isSize(a.vramBytes) || !isSize(a.model.bytes)) return 'announced sizes that make no sense';
  if (w.plan.kind === 'waiting') return a.id === w.host?.id ? 'would host, but the mesh waits (see above)' : 'the mesh waits (see above)';
  if (w.host !== null && !mutuallyConnected(w.view, w.host.id, a.id)) return `not directly connected to the host ${w.host.name} (its llama-server dials every stage)`;
  if (a.vramBytes === 0) return 'offers no memory';
  return 'not needed: the stages chosen hold enough (each extra stage costs a round trip per token)';
}

/** With no plan: the host elect would pick (same order as elect), to say what a plan would need. */
function wouldBeHost(view: View, fingerprint: string | null): Announcement | undefined {
  if (fingerprint === null) return undefined;
  const candidates = connectedPart(view).filter((a) => a.role !== 'client' && a.role !== 'worker' && a.model?.fingerprint === fingerprint && isSize(a.vramBytes));
  const preferred = candidates.some((a) => a.role === 'host') ? candidates.filter((a) => a.role === 'host') : candidates;
  return [...preferred].sort((a, b) => b.vramBytes - a.vramBytes || (a.id < b.id ? -1 : 1))[0];
}

function lines(plan: Plan, host: Announcement | null, need: PlanPreview['need'], stages: readonly PreviewStage[], leftOut: PlanPreview['leftOut']): string[] {
  const out: string[] = [];
  if (need !== null && host !== null) {
    const kv = need.kv !== null && need.kvBytes > 0 ? ` + ${formatSize(need.kvBytes)} KV cache (${describeServe(need.kv)}, flash attention ${need.kv.flashAttn})` : '';
    out.push(`model ${host.model?.name} (${formatSize(need.modelBytes)}): a plan must hold ${formatSize(need.bytes)} = 1.1 x the model${kv}`);
  }
  if (plan.kind === 'waiting') {
    out.push(`the mesh waits: ${plan.reason}`);
  } else {
    const total = stages.reduce((n, s) => n + s.vramBytes, 0);
    out.push(`host: ${host?.name ?? plan.host} (${plan.host.slice(0, 10)}); ${stages.length} stage(s) holding ${formatSize(total)}`);
    for (const s of stages) {
      const layers = s.layers === null ? '' : s.layers[1] > s.layers[0] ? `layers ${s.layers[0]}-${s.layers[1] - 1} (${s.layers[1] - s.layers[0]})` : 'no layers';
      const extra = [layers, s.kvBytes > 0 ? `KV ${formatSize(s.kvBytes)}` : '', s.host ? 'output layer' : ''].filter((x) => x !== '').join(', ');
      out.push(`  ${s.host ? 'host  ' : 'worker'} ${s.name} (${s.id.slice(0, 10)}): ${(s.share * 100).toFixed(0)}% of the layers${extra === '' ? '' : `: ${extra}`}; offers ${formatSize(s.vramBytes)}`);
    }
  }
  for (const l of leftOut) out.push(`  left out: ${l.name} (${l.id.slice(0, 10)}): ${l.why}`);
  return out;
}
