// One seeded churn scenario: nodes join, then phases of random churn (joins, leaves, crashes, hangs,
// partitions, heals, process crashes, latency and loss), each followed by a wait until the world converges.
// Neutral phases (lite clients come and go, latency changes) must not restart anything.
import type { EndpointId, RolePreference } from '../../src/machines/mesh-types.ts';
import { convergenceGaps } from './converged.ts';
import { CALM, type NetworkConditions } from './network.ts';
import { Prng } from './prng.ts';
import { MODEL, nodeId, SimWorld, type NodeSpec, type Violation, type WorldOptions } from './world.ts';

export interface ScenarioOptions {
  /** Most nodes alive at once (ids n00..). */
  readonly maxNodes: number;
  /** Churn phases after the initial join. */
  readonly phases: number;
  /** Planted bugs, for the tests that show the checker bites. */
  readonly world?: WorldOptions;
  /** Keep a readable trace of what happened (for replaying one seed). */
  readonly trace?: boolean;
  /** Probability that a phase is neutral (cannot change any plan). */
  readonly neutralRate?: number;
}

export interface ScenarioResult {
  readonly seed: number;
  /** Churn events applied (joins, leaves, crashes, ...). */
  readonly events: number;
  /** Messages accepted onto connections. */
  readonly messages: number;
  /** Scheduler callbacks run (timers, deliveries). */
  readonly steps: number;
  readonly simMs: number;
  /** Per phase: simulated ms from its last event until every part ran what it should. */
  readonly convergenceMs: readonly number[];
  readonly violations: readonly Violation[];
  readonly trace: readonly string[];
}

const GB = 1e9;
const VRAMS = [2, 4, 6, 8, 12, 16].map((g) => g * GB);
/** After its last event, a phase may take this long to converge (partitions heal through capped backoff). */
export const MAX_CONVERGE_MS = 60_000;
/** Converged and quiet for this long ends a phase. */
const QUIET_MS = 2_000;
const STEP_MS = 250;

type Churn =
  | 'join'
  | 'leave'
  | 'crash'
  | 'hang'
  | 'partition'
  | 'heal'
  | 'crashProcess'
  | 'conditions'
  | 'clientJoin'
  | 'clientLeave'
  | 'clientCrash';

const CHURN: readonly Churn[] = ['join', 'join', 'leave', 'crash', 'hang', 'partition', 'heal', 'crashProcess', 'conditions', 'clientJoin', 'clientLeave'];
const NEUTRAL: readonly Churn[] = ['clientJoin', 'clientLeave', 'clientCrash', 'conditions'];

/** The sizes `model-tests/churn.test.ts` uses for a seed, so the CLI can replay exactly that scenario. */
export function testSizes(seed: number): { maxNodes: number; phases: number } {
  return { maxNodes: 4 + (seed % 3), phases: 2 };
}

/** The command that replays one seed with the given sizes. */
export function replayCommand(seed: number, sizes: { maxNodes: number; phases: number }): string {
  return `npx tsx model-tests/sim/cli.ts --seed ${seed} --nodes ${sizes.maxNodes} --phases ${sizes.phases}`;
}

export function runScenario(seed: number, options: ScenarioOptions): ScenarioResult {
  const rng = new Prng(seed);
  const world = new SimWorld(seed, options.world);
  const trace: string[] = [];
  const note = (line: string) => {
    if (options.trace === true) trace.push(`${String(world.now()).padStart(7)} ms  ${line}`);
  };
  const specs = makeSpecs(rng, options.maxNodes);
  let events = 0;
  const convergence: number[] = [];

  const up = (filter: (s: NodeSpec) => boolean) => world.upNodes().filter((n) => filter(n.spec)).map((n) => n.spec.id);
  const down = (filter: (s: NodeSpec) => boolean) =>
    specs.filter((s) => filter(s) && !world.upNodes().some((n) => n.spec.id === s.id) && world.nodes.get(s.id)?.status !== 'leaving');
  const isClient = (s: NodeSpec) => s.role === 'client';
  const anyNode = () => true;

  // A joiner holds invites from up to two running nodes (reachable ones first): one invite from a node that
  // then crashes would leave it a mesh of its own, which no partition explains.
  const join = (spec: NodeSpec) => {
    const all = up(anyNode);
    const reachable = all.filter((id) => !world.net.isHung(id) && world.net.groupOf(id) === 0);
    const bootstrap: EndpointId[] = [];
    for (const pool of [reachable, all, all]) {
      const rest = pool.filter((id) => !bootstrap.includes(id));
      if (rest.length > 0 && bootstrap.length < 2) bootstrap.push(rng.pick(rest));
    }
    note(`join ${spec.id} (${spec.role}, ${spec.vramBytes / GB} GB${spec.model === null ? ', no model' : ''}) via ${bootstrap.join(',') || 'nobody'}`);
    world.start(spec, bootstrap);
  };

  // Applies one event; returns the time of a follow-up it scheduled (an unhang), if any.
  const apply = (kind: Churn, neutral: boolean): number | null => {
    events++;
    switch (kind) {
      case 'join':
      case 'clientJoin': {
        const pool = down(kind === 'clientJoin' ? isClient : (s) => !isClient(s));
        if (pool.length === 0) return null;
        join(rng.pick(pool));
        return null;
      }
      case 'leave':
      case 'clientLeave': {
        const pool = up(kind === 'clientLeave' ? isClient : (s) => !isClient(s));
        if (pool.length === 0) return null;
        const id = rng.pick(pool);
        note(`leave ${id}`);
        world.leave(id);
        return null;
      }
      case 'crash':
      case 'clientCrash': {
        const pool = up(kind === 'clientCrash' ? isClient : (s) => !isClient(s));
        if (pool.length === 0) return null;
        const id = rng.pick(pool);
        note(`crash ${id}`);
        world.crash(id);
        return null;
      }
      case 'hang': {
        const pool = up(anyNode).filter((id) => !world.net.isHung(id));
        if (pool.length === 0) return null;
        const id = rng.pick(pool);
        const forMs = rng.int(500, 12_000);
        note(`hang ${id} for ${forMs} ms`);
        world.hang(id, true);
        world.sched.setTimeout(() => {
          note(`unhang ${id}`);
          world.hang(id, false);
        }, forMs);
        return world.now() + forMs;
      }
      case 'partition': {
        const ids = up(anyNode);
        if (ids.length < 2) return null;
        const groups = new Map<EndpointId, number>();
        for (const id of ids) groups.set(id, rng.int(0, 1));
        note(`partition ${[0, 1].map((g) => ids.filter((id) => groups.get(id) === g).join(',')).join(' | ')}`);
        world.net.partition(groups);
        return null;
      }
      case 'heal':
        note('heal');
        world.net.heal();
        return null;
      case 'crashProcess': {
        const live = world.table.liveAll();
        if (live.length === 0) return null;
        const p = rng.pick(live);
        note(`crash ${p.kind}-server #${p.pid} on ${p.node}`);
        world.crashProcess(p, 'simulated crash');
        return null;
      }
      case 'conditions': {
        const c = neutral ? calmish(rng) : rough(rng);
        note(`network: latency ${c.latencyMs[0]}-${c.latencyMs[1]} ms, loss ${c.lossRate}`);
        world.net.conditions = c;
        return null;
      }
    }
  };

  // Runs the clock until every part runs what it should and the mesh is quiet; returns false if it never did.
  const converge = (lastEventAt: number, phase: string): boolean => {
    let convergedSince: number | null = null;
    // Follow-ups (an unhang) belong to the phase: nothing counts as converged before the last of them.
    world.sched.runUntil(lastEventAt);
    for (let t = lastEventAt + STEP_MS; t <= lastEventAt + MAX_CONVERGE_MS; t += STEP_MS) {
      world.sched.runUntil(t);
      if (convergenceGaps(world).length > 0) {
        convergedSince = null;
        continue;
      }
      convergedSince ??= t;
      const quiet = t - world.net.lastBusyAt >= QUIET_MS && t - world.table.lastChangeAt >= QUIET_MS;
      if (quiet && t - convergedSince >= QUIET_MS) {
        convergence.push(Math.max(0, convergedSince - lastEventAt));
        note(`${phase}: converged ${convergedSince - lastEventAt} ms after its last event`);
        return true;
      }
    }
    const gaps = convergenceGaps(world);
    const twoHosts = gaps.filter((g) => g.kind === 'two-hosts');
    if (twoHosts.length > 0) world.violate('two-hosts-in-one-part', `${phase}: ${twoHosts.map((g) => g.message).join('; ')}`);
    world.violate('not-converged', `${phase}: not converged ${MAX_CONVERGE_MS} ms after its last event: ${gaps.map((g) => g.message).join('; ') || 'still busy'}`);
    note(`${phase}: NOT converged`);
    if (options.trace === true) for (const line of describeNodes(world)) note(`  ${line}`);
    return false;
  };

  // Phase 0: between half and all of the nodes form the mesh (lite clients come later, as churn).
  const initial = rng.int(Math.max(2, Math.ceil(options.maxNodes / 2)), options.maxNodes);
  const starters = specs.filter((s) => !isClient(s)).slice(0, initial);
  let t = 0;
  for (const spec of starters) {
    world.sched.runUntil(t);
    events++;
    join(spec);
    t += rng.int(0, 1500);
  }
  let settled = converge(world.now(), 'join');

  for (let phase = 1; phase <= options.phases; phase++) {
    const neutral = rng.chance(options.neutralRate ?? 0.3);
    const pool = neutral ? NEUTRAL : CHURN;
    const count = rng.int(1, 4);
    const start = world.now();
    const spawnedBefore = world.table.all.length;
    const endedBefore = world.table.all.filter((p) => p.endedAt !== null).length;
    const times = Array.from({ length: count }, () => start + rng.int(0, 3_000)).sort((a, b) => a - b);
    let lastEventAt = start;
    for (const at of times) {
      world.sched.runUntil(at);
      const follow = apply(rng.pick(pool), neutral);
      lastEventAt = Math.max(lastEventAt, world.now(), follow ?? 0);
    }
    if (!neutral && rng.chance(0.5)) {
      events++;
      note('heal');
      world.net.heal();
    }
    const label = `phase ${phase} (${neutral ? 'neutral' : 'churn'})`;
    const ok = converge(lastEventAt, label);
    if (neutral && settled && ok) {
      const spawned = world.table.all.slice(spawnedBefore);
      const ended = world.table.all.filter((p) => p.endedAt !== null).length - endedBefore;
      if (spawned.length > 0 || ended > 0) {
        world.violate(
          'restart-without-plan-change',
          `${label}: no plan could change, yet ${spawned.length} process(es) started and ${ended} ended: ` +
            spawned.map((p) => `${p.node}:${p.kind}#${p.pid}`).join(', '),
        );
      }
    }
    settled = ok;
  }

  // Make peace, converge once more, then stop everything: no process may outlive its node.
  world.net.heal();
  for (const n of world.upNodes()) world.hang(n.spec.id, false);
  world.net.conditions = CALM;
  note('final: heal, unhang, calm');
  converge(world.now(), 'final');
  world.stopAll();

  return {
    seed,
    events,
    messages: world.net.sent,
    steps: world.sched.fired,
    simMs: world.now(),
    convergenceMs: convergence,
    violations: world.violations,
    trace,
  };
}

function makeSpecs(rng: Prng, n: number): NodeSpec[] {
  const specs: NodeSpec[] = [];
  for (let i = 0; i < n; i++) {
    // Keep most nodes model holders; the first two always are, so every scenario can form a plan.
    const r = rng.next();
    const role: RolePreference = i < 2 ? 'auto' : r < 0.2 ? 'client' : r < 0.3 ? 'worker' : r < 0.35 ? 'host' : 'auto';
    specs.push({
      id: nodeId(i),
      role,
      vramBytes: role === 'client' ? 0 : rng.pick(VRAMS),
      model: role === 'client' ? null : MODEL,
    });
  }
  return specs;
}

// Neutral phases keep every delay far below the heartbeat bounds, so no link may look dead.
function calmish(rng: Prng): NetworkConditions {
  return { latencyMs: [rng.int(1, 20), rng.int(20, 150)], lossRate: rng.pick([0, 0.01, 0.05]), retransmitMs: 200 };
}

function rough(rng: Prng): NetworkConditions {
  return { latencyMs: [rng.int(1, 50), rng.int(50, 400)], lossRate: rng.pick([0, 0.05, 0.1, 0.2]), retransmitMs: 250 };
}

/** For people replaying a seed: each node's machine state (diagnostics only; checks never read these). */
export function describeNodes(world: SimWorld): string[] {
  return world.upNodes().map((n) => {
    const snap = n.actor.getSnapshot();
    const c = snap.context;
    const plan = c.running === null ? 'none' : c.running.kind === 'ready' ? `${c.running.id} host ${c.running.host}` : `${c.running.id} waiting`;
    const peers = Object.entries(c.peers)
      .map(([id, ref]) => `${id}:${JSON.stringify(ref.getSnapshot().value)}`)
      .join(' ');
    return (
      `${n.spec.id} ${JSON.stringify(snap.value)} running ${plan} latest ${c.plan?.id ?? 'none'} rpc ${c.rpc} llama ${c.llama} ` +
      `rpcReady ${JSON.stringify(c.rpcReady)} told ${c.rpcReadySent} links [${c.links.join(',')}] peers ${peers}`
    );
  });
}
