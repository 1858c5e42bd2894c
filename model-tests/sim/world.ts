// The simulated world: nodes running the real node machine (with fake process slots) over the in-memory network
// and the fake process table, on one deterministic clock. Invariants that hold at every step are checked
// in the hooks here, against the process table and the network's log, never against a machine's context.
import { createActor, fromCallback, type Actor } from 'xstate';
import { llamaServerMachine } from '../../src/machines/llama-server.machine.ts';
import { VIEW_LIMITS } from '../../src/machines/gossip.ts';
import {
  PROTOCOL_VERSION,
  asEndpointId,
  type Announcement,
  type AnnouncementAuthority,
  type EndpointId,
  type ModelIdentity,
  type RolePreference,
} from '../../src/machines/mesh-types.ts';
import { nodeMachine, type RpcTunnelPolicy } from '../../src/machines/node.machine.ts';
import type { NetworkCommand, NetworkEvent } from '../../src/machines/protocol.ts';
import { rpcServerMachine } from '../../src/machines/rpc-server.machine.ts';
import { tunnelDecision } from '../../src/machines/tunnel-policy.ts';
import { SimNetwork } from './network.ts';
import { Prng } from './prng.ts';
import { fakeProcessSlots, ProcessTable, type ProcRecord, type WorldMutants } from './processes.ts';
import { SimScheduler } from './scheduler.ts';
import { fakeFacts } from '../../test/support/fake-facts.ts';

/**
 * The node machine's re-announcement period in the simulator (the product's is REANNOUNCE_MS, 30 s): short, so
 * that facts really expire within a scenario (VIEW_LIMITS.ttlTicks periods, 30 s, e.g. across a long partition)
 * and the convergence check covers the expiry rule.
 */
export const SIM_REANNOUNCE_MS = 5_000;

export const MODEL: ModelIdentity = { name: 'sim-model', bytes: 10e9, fingerprint: 'fp-sim-model' };

export interface NodeSpec {
  readonly id: EndpointId;
  readonly role: RolePreference;
  readonly vramBytes: number;
  readonly model: ModelIdentity | null;
}

export type NodeMachine = typeof nodeMachine;

export interface WorldOptions {
  /** Plants a bug in the machines through `.provide()` (never by editing them). */
  readonly mutateNode?: (machine: NodeMachine) => NodeMachine;
  /** Plants a bug in the world around the machines. */
  readonly worldMutants?: WorldMutants;
  /** Each node's signer/verifier (default: the test stand-in of test/support/fake-facts.ts). */
  readonly factsFor?: (id: EndpointId) => AnnouncementAuthority;
  /** The machines' re-announcement period (default SIM_REANNOUNCE_MS). */
  readonly reannounceMs?: number;
}

export type ViolationKind =
  | 'worker-serves-two-hosts'
  | 'worker-serves-unready-host'
  | 'two-llama-servers-on-one-node'
  | 'not-converged'
  | 'two-hosts-in-one-part'
  | 'restart-without-plan-change'
  | 'processes-left-behind';

export interface Violation {
  readonly at: number;
  readonly kind: ViolationKind;
  readonly message: string;
}

type NodeActor = Actor<NodeMachine>;

/** What one node last heard of another: the newest (epoch, seq), and when it last learned a newer one (null: an invite). */
interface Heard {
  readonly epoch: number;
  readonly seq: number;
  readonly freshAt: number | null;
}

export interface SimNode {
  readonly spec: NodeSpec;
  readonly epoch: number;
  readonly actor: NodeActor;
  status: 'up' | 'leaving' | 'left' | 'crashed';
  /** How the network slot should close when the actor stops. */
  gracefulClose: boolean;
}

export class SimWorld {
  readonly sched = new SimScheduler();
  readonly prng: Prng;
  readonly net: SimNetwork;
  readonly table: ProcessTable;
  readonly nodes = new Map<EndpointId, SimNode>();
  readonly violations: Violation[] = [];
  private epochs = new Map<EndpointId, number>();

  constructor(
    seed: number,
    private readonly options: WorldOptions = {},
  ) {
    // The network draws its own numbers, so a planted bug changes the machines' behaviour, not the schedule.
    this.prng = new Prng(seed ^ 0x5bd1e995);
    this.net = new SimNetwork(this.sched, this.prng);
    this.table = new ProcessTable(this.sched, {
      rpcDecision: (worker, host, planId) => {
        const node = this.nodes.get(worker);
        return tunnelDecision(node === undefined || node.status === 'crashed' ? null : node.actor.getSnapshot().context, host, 'rpc', planId);
      },
      canTunnel: (a, b) => this.net.hasLink(a, b) && this.net.reachable(a, b),
      onConnect: (llama, rpc) => this.checkConnect(llama, rpc),
      onSpawn: (p) => this.checkSpawn(p),
    });
    this.net.onLinkClosed((a, b) => this.table.dropTunnelsBetween(a, b));
    this.net.onDeliver((to, event) => this.learn(to, event));
  }

  // ---- what each node can know, from what the network really delivered -------------------------------
  // A node dials every node it has heard of (its invites, every announcement gossiped to it, every peer that
  // connected to it), except one it saw leave, until it hears of a newer epoch of it; and except one whose
  // facts expired: no newer announcement of it reached the node for the TTL while they were not connected
  // (the product's rule, src/machines/gossip.ts expireStale; invites never expire).
  private heard = new Map<EndpointId, Map<EndpointId, Heard>>();
  private invites = new Map<EndpointId, Set<EndpointId>>();
  private sawLeave = new Map<EndpointId, Map<EndpointId, number>>();

  private learn(to: EndpointId, event: NetworkEvent): void {
    const heard = this.heard.get(to);
    if (heard === undefined) return;
    const now = this.sched.now();
    const note = (id: EndpointId, epoch: number, seq: number) => {
      if (id === to) return;
      const h = heard.get(id);
      if (h === undefined || (h.freshAt !== null && now - h.freshAt >= this.ttlMs && !this.net.hasLink(to, id) && !this.invites.get(to)?.has(id))) {
        // New, or forgotten: only a newer announcement than the last one held brings it back.
        if (h !== undefined && (epoch < h.epoch || (epoch === h.epoch && seq <= h.seq))) return;
        heard.set(id, { epoch, seq, freshAt: now });
        return;
      }
      if (epoch > h.epoch || (epoch === h.epoch && seq > h.seq)) heard.set(id, { epoch, seq, freshAt: now });
    };
    if (event.type === 'net.peer.connected') {
      const h = heard.get(event.id);
      const epoch = this.nodes.get(event.id)?.epoch ?? -1;
      if (h === undefined || h.epoch < epoch) heard.set(event.id, { epoch, seq: -1, freshAt: now });
      else heard.set(event.id, { ...h, freshAt: Math.max(h.freshAt ?? now, now) });
    }
    if (event.type !== 'net.message') return;
    if (event.message.type === 'gossip') for (const a of event.message.announcements) note(a.id, a.epoch, a.seq);
    if (event.message.type === 'leaving') this.sawLeave.get(to)?.set(event.from, this.nodes.get(event.from)?.epoch ?? -1);
  }

  private get ttlMs(): number {
    return VIEW_LIMITS.ttlTicks * (this.options.reannounceMs ?? SIM_REANNOUNCE_MS);
  }

  /** Whether `a` will dial `b` once it can reach it. */
  willDial(a: EndpointId, b: EndpointId): boolean {
    const h = this.heard.get(a)?.get(b);
    if (h === undefined) return false;
    const expired = h.freshAt !== null && this.sched.now() - h.freshAt >= this.ttlMs && !this.net.hasLink(a, b) && !this.invites.get(a)?.has(b);
    if (expired) return false;
    const left = this.sawLeave.get(a)?.get(b);
    return left === undefined || h.epoch > left;
  }

  now(): number {
    return this.sched.now();
  }

  violate(kind: ViolationKind, message: string): void {
    this.violations.push({ at: this.sched.now(), kind, message });
  }

  upNodes(): SimNode[] {
    return [...this.nodes.values()].filter((n) => n.status === 'up');
  }

  // ---- churn ------------------------------------------------------------------------------------------

  start(spec: NodeSpec, bootstrap: readonly EndpointId[]): void {
    const old = this.nodes.get(spec.id);
    if (old !== undefined && (old.status === 'up' || old.status === 'leaving')) throw new Error(`${spec.id} is already running`);
    const epoch = (this.epochs.get(spec.id) ?? 0) + 1;
    this.epochs.set(spec.id, epoch);
    const self: Announcement = {
      id: spec.id,
      epoch,
      seq: 0,
      name: spec.id,
      role: spec.role,
      vramBytes: spec.vramBytes,
      model: spec.model,
      version: PROTOCOL_VERSION,
      serving: false,
      addrs: [`sim:${spec.id}`],
      connectedTo: [],
    };
    const slots = fakeProcessSlots(spec.id, this.table, this.sched, this.options.worldMutants);
    const holder: { node: SimNode | null } = { node: null };
    const network = fromCallback<NetworkCommand, { self: EndpointId }>(({ sendBack, receive }) => {
      this.net.attach(spec.id, sendBack);
      receive((cmd) => this.net.command(spec.id, cmd));
      return () => this.net.detach(spec.id, holder.node?.gracefulClose ?? true);
    });
    let machine = nodeMachine.provide({
      delays: { reannounce: this.options.reannounceMs ?? SIM_REANNOUNCE_MS },
      actors: {
        network,
        rpcServer: rpcServerMachine.provide({ actors: slots.rpc }),
        llamaServer: llamaServerMachine.provide({ actors: slots.llama }),
      },
    });
    if (this.options.mutateNode !== undefined) machine = this.options.mutateNode(machine);
    const actor = createActor(machine, {
      clock: this.sched,
      input: {
        self,
        bootstrap: bootstrap.map((id) => ({ id, addrs: [`sim:${id}`] })),
        facts: this.options.factsFor?.(spec.id) ?? fakeFacts(),
      },
    });
    // A fresh run remembers nothing but its invites.
    this.heard.set(spec.id, new Map(bootstrap.map((id) => [id, { epoch: -1, seq: -1, freshAt: null }])));
    this.invites.set(spec.id, new Set(bootstrap));
    this.sawLeave.set(spec.id, new Map());
    const node: SimNode = { spec, epoch, actor, status: 'up', gracefulClose: true };
    holder.node = node;
    this.nodes.set(spec.id, node);
    // The tunnel layer's hand-off, as NodeTunnels.follow() does it (src/actors/tunnels.actor.ts): the moment
    // the policy leaves a host or a plan, every rpc tunnel of that host closes.
    let last: RpcTunnelPolicy | null = null;
    actor.subscribe({
      next: (snap) => {
        const policy = snap.context.rpcTunnelPolicy;
        if (last !== null && this.options.worldMutants?.tunnelIgnoresPolicy !== true) {
          if (policy === null || policy.host !== last.host || policy.planId !== last.planId) this.table.closeRpcTunnelsOf(spec.id, last.host);
        }
        last = policy;
      },
      complete: () => {
        if (node.status === 'leaving') node.status = 'left';
        const left = this.table.liveOf(spec.id);
        if (left.length > 0) {
          this.violate('processes-left-behind', `${spec.id} stopped but ${left.map((p) => `${p.kind}#${p.pid}`).join(', ')} still run`);
        }
      },
      error: (err) => this.violate('processes-left-behind', `${spec.id} failed: ${String(err)}`),
    });
    actor.start();
  }

  /** A graceful stop: the node says `leaving` and stops its processes. */
  leave(id: EndpointId): void {
    const node = this.nodes.get(id);
    if (node === undefined || node.status !== 'up') return;
    node.status = 'leaving';
    node.actor.send({ type: 'node.stop', reason: 'simulated leave' });
  }

  /** Power loss: the node and its processes vanish at once, nobody is told. */
  crash(id: EndpointId): void {
    const node = this.nodes.get(id);
    if (node === undefined || (node.status !== 'up' && node.status !== 'leaving')) return;
    node.status = 'crashed';
    node.gracefulClose = false;
    for (const p of this.table.liveOf(id)) this.table.end(p, 'node-crash', 'machine lost power');
    this.net.detach(id, false);
    this.net.setHung(id, false);
    node.actor.stop();
  }

  hang(id: EndpointId, hung: boolean): void {
    const node = this.nodes.get(id);
    if (node === undefined || node.status !== 'up') return;
    this.net.setHung(id, hung);
  }

  crashProcess(p: ProcRecord, reason: string): void {
    this.table.end(p, 'crash', reason);
  }

  /** Stops every running node gracefully and runs the clock until they are done. */
  stopAll(maxMs = 30_000): void {
    for (const n of this.upNodes()) {
      this.net.setHung(n.spec.id, false);
      this.leave(n.spec.id);
    }
    this.sched.runUntil(this.sched.now() + maxMs);
    for (const n of this.nodes.values()) {
      if (n.status === 'leaving') {
        this.violate('processes-left-behind', `${n.spec.id} did not finish stopping within ${maxMs} ms`);
        n.actor.stop();
      }
    }
    const left = this.table.liveAll();
    if (left.length > 0) {
      this.violate('processes-left-behind', `after every node stopped: ${left.map((p) => `${p.node}:${p.kind}#${p.pid}`).join(', ')}`);
    }
  }

  // ---- invariants at every step ------------------------------------------------------------------------

  private checkSpawn(p: ProcRecord): void {
    if (p.kind !== 'llama') return;
    const others = this.table.liveOf(p.node, 'llama').filter((x) => x !== p);
    if (others.length > 0) {
      this.violate('two-llama-servers-on-one-node', `${p.node} started llama-server #${p.pid} while #${others[0]!.pid} still runs`);
    }
  }

  // A worker's rpc-server serves at most one host, and only the host it told rpc-ready for this plan
  // since this rpc-server started (what the network really carried).
  private checkConnect(llama: ProcRecord, rpc: ProcRecord): void {
    if (rpc.node === llama.node) return;
    for (const pid of rpc.peers) {
      const other = this.table.all.find((x) => x.pid === pid);
      if (other !== undefined && this.table.isLive(other)) {
        this.violate(
          'worker-serves-two-hosts',
          `rpc-server of ${rpc.node} serves ${other.node} (llama #${other.pid}) and now also ${llama.node} (llama #${llama.pid})`,
        );
      }
    }
    const told = (this.net.rpcReady.get(rpc.node) ?? []).filter((r) => r.at >= rpc.spawnedAt);
    const last = told[told.length - 1];
    if (last === undefined || last.to !== llama.node || last.planId !== llama.planId) {
      this.violate(
        'worker-serves-unready-host',
        `${llama.node} (plan ${llama.planId}) reached the rpc-server of ${rpc.node}, which last said rpc-ready ` +
          (last === undefined ? 'to nobody' : `to ${last.to} for plan ${last.planId}`),
      );
    }
  }
}

export function nodeId(i: number): EndpointId {
  return asEndpointId(`n${String(i).padStart(2, '0')}`);
}
