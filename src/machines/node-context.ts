// What one node knows, as the node machine (node.machine.ts) keeps it: the context's types, its initial value,
// and the facts derived from it (this node's role, whether its part of the plan is up, what it announces).
// The readers of a node's snapshot (the tunnels, the API's routing, /api/status) depend on this, not on how
// the machine moves. Pure.
import type { ActorRefFrom } from 'xstate';
import { emptyFreshness, emptyView, setSelf, type Freshness } from './gossip.ts';
import type { Announcement, AnnouncementAuthority, EndpointId, Plan, View } from './mesh-types.ts';
import { roleIn, sameIds, type NodeRole } from './node-plan.ts';
import type { peerMachine } from './peer.machine.ts';
import type { NetworkCommand } from './protocol.ts';

export interface BootstrapPeer {
  readonly id: EndpointId;
  readonly addrs: readonly string[];
}

export interface NodeInput {
  /** This node's announcement as it starts (its epoch chosen by the composition root, not serving yet). */
  readonly self: Announcement;
  /** Where to join: the inviting node from the token. Empty for the first node of a mesh. */
  readonly bootstrap?: readonly BootstrapPeer[];
  /** Signs this node's announcements and verifies everyone's (src/io/wire/announcement-signature.ts). */
  readonly facts: AnnouncementAuthority;
}

/** The one host whose rpc tunnels this node's rpc-server may accept, for which plan. */
export interface RpcTunnelPolicy {
  readonly host: EndpointId;
  readonly planId: string;
}

/** Where a child process stands, as the node last heard from its lifecycle machine. */
export type ProcessState = 'down' | 'starting' | 'ready' | 'stopping';

type PeerRef = ActorRefFrom<typeof peerMachine>;

export interface NodeContext {
  readonly self: Announcement;
  /** The gossip table: what to tell new peers and what to relay. The election machine keeps its own copy. */
  readonly view: View;
  /** The age of each fact in `view`, in re-announcement ticks, and the ids expired or evicted from it. */
  readonly freshness: Freshness;
  /** Re-announcement ticks since the node started: the clock of `freshness`. */
  readonly tick: number;
  readonly facts: AnnouncementAuthority;
  readonly bootstrap: readonly BootstrapPeer[];
  readonly peers: Readonly<Record<string, PeerRef>>;
  /** Whether the network reported each connection as direct (relayed ones never count as connectedTo). */
  readonly direct: Readonly<Record<string, boolean>>;
  /** Peers whose machine is up (connected or suspect), sorted. */
  readonly links: readonly EndpointId[];
  /** Peers that said `leaving`, with the epoch they left in: a later epoch is a new run and is dialed again. */
  readonly departed: Readonly<Record<string, number>>;
  /** The latest plan the election sent; null before the first. */
  readonly plan: Plan | null;
  /** The plan whose processes this node runs or is bringing up; null before the first start. */
  readonly running: Plan | null;
  readonly rpc: ProcessState;
  readonly rpcPort: number | null;
  readonly llama: ProcessState;
  readonly llamaPort: number | null;
  /** How many llama-servers this node has started (the plan's generation counter on a host). */
  readonly generation: number;
  /** Host side: which plan id each remote worker last said its rpc-server is ready for. */
  readonly rpcReady: Readonly<Record<string, string>>;
  /** Worker side: the plan id this node last told its host about (null: not told, tell again). */
  readonly rpcReadySent: string | null;
  /** What the tunnel layer enforces: see the file header. */
  readonly rpcTunnelPolicy: RpcTunnelPolicy | null;
  /** Host: workers whose rpc tunnel hung once, with the plan it hung in (stage-health.ts). */
  readonly suspects: Readonly<Record<string, string>>;
  /** Host: workers left out of `connectedTo` (so out of every plan) for a while, after hanging twice. */
  readonly quarantined: readonly EndpointId[];
  /** Requests on this node's APIs that are being answered (the composition root counts them): a planned change drains them. */
  readonly inFlight: number;
  readonly stopReason: string | null;
}

/** The context a node starts with. */
export function initialNodeContext(input: NodeInput): NodeContext {
  const self = input.facts.sign(input.self);
  return {
    self,
    view: emptyView(self),
    freshness: emptyFreshness(),
    tick: 0,
    facts: input.facts,
    bootstrap: input.bootstrap ?? [],
    peers: {},
    direct: {},
    links: [],
    departed: {},
    plan: null,
    running: null,
    rpc: 'down',
    rpcPort: null,
    llama: 'down',
    llamaPort: null,
    generation: 0,
    rpcReady: {},
    rpcReadySent: null,
    rpcTunnelPolicy: null,
    suspects: {},
    quarantined: [],
    inFlight: 0,
    stopReason: null,
  };
}

/** Everything this node knows, its own announcement first: the handshake's gossip. */
export function viewMessage(context: Pick<NodeContext, 'self' | 'view'>, to: EndpointId): NetworkCommand {
  const others = Object.values(context.view.announcements).filter((a) => a.id !== context.self.id);
  return { type: 'net.send', to, message: { type: 'gossip', announcements: [context.self, ...others] } };
}


/**
 * What this node should announce now (direct links, serving), with seq raised and signed, and the view that
 * holds it; null when nothing changed, unless `refresh` (the periodic re-announcement that keeps this node's
 * facts from expiring elsewhere) asks for a new seq anyway.
 */
export function nextSelf(context: NodeContext, refresh = false): { self: Announcement; view: View } | null {
  // A quarantined stage (stage-health.ts) is not announced: no plan of ours takes it meanwhile.
  const connectedTo = context.links.filter((id) => context.direct[id] === true && !context.quarantined.includes(id));
  const serving = isServing(context);
  if (!refresh && serving === context.self.serving && sameIds(connectedTo, context.self.connectedTo)) return null;
  const { sig: _, ...unsigned } = context.self;
  const self = context.facts.sign({ ...unsigned, seq: context.self.seq + 1, connectedTo, serving });
  return { self, view: setSelf(context.view, self) };
}

/** Ids this node never drops for age or bounds: its links and its invites. */
export function protectedIds(context: Pick<NodeContext, 'links' | 'bootstrap'>): (id: EndpointId) => boolean {
  return (id) => context.links.includes(id) || context.bootstrap.some((b) => b.id === id);
}

/** The plan's role of this node for the plan it runs. */
export function runningRole(context: Pick<NodeContext, 'running' | 'self'>): NodeRole {
  return roleIn(context.running, context.self.id);
}

/** Whether everything the running plan asks of this node is up. */
export function planIsUp(context: NodeContext): boolean {
  if (context.running === null) return false;
  switch (runningRole(context)) {
    case 'host':
      return context.rpc === 'ready' && context.llama === 'ready';
    case 'worker':
      return context.rpc === 'ready' && context.rpcReadySent === context.running.id;
    case 'standby':
    case 'waiting':
      return true;
  }
}

/** What the node announces as `serving`: its part of the plan is up. */
export function isServing(context: NodeContext): boolean {
  switch (runningRole(context)) {
    case 'host':
      return context.rpc === 'ready' && context.llama === 'ready';
    case 'worker':
      return context.rpc === 'ready';
    default:
      return false;
  }
}

/** Whether the elected plan is another than the one this node runs (a kill -> fresh start is due). */
export function planDiffersFromRunning(context: Pick<NodeContext, 'plan' | 'running'>): boolean {
  return context.running !== null && context.plan !== null && context.plan.id !== context.running.id;
}

/**
 * Whether a change of plan should let what runs now finish first: it is planned (every stage of the running
 * plan is still linked, so its processes work) and something is in flight here: on the host, requests being
 * answered; on a worker, its host still serving the running plan (its llama-server has requests of its own to
 * finish, through this node's rpc-server). A change because a stage died never drains: its llama-server is broken.
 */
export function hasWorkToDrain(context: NodeContext): boolean {
  const plan = context.running;
  if (plan === null || plan.kind !== 'ready') return false;
  const intact = plan.stages.every((s) => s.id === context.self.id || context.links.includes(s.id));
  if (!intact) return false;
  switch (runningRole(context)) {
    case 'host':
      return context.llama === 'ready' && context.inFlight > 0;
    case 'worker':
      return context.rpc === 'ready' && context.view.announcements[plan.host]?.serving === true;
    default:
      return false;
  }
}
