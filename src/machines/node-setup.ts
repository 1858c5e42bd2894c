// The node machine's named parts (events, delays, actor slots, guards, actions); node.machine.ts wires them into states.
import { assign, enqueueActions, raise, setup, type ActorRefFrom, type AnyActorRef } from 'xstate';
import { electionMachine, SETTLE_MS, type ElectionEvent, type ElectionPlannedEvent } from './election.machine.ts';
import { acceptGossip, expireStale, forget, mutuallyConnected, sameFacts } from './gossip.ts';
import { llamaServerMachine, type LlamaServerCommand, type LlamaServerNotice } from './llama-server.machine.ts';
import type { EndpointId, Plan } from './mesh-types.ts';
import {
  nextSelf,
  planIsUp,
  protectedIds,
  runningRole,
  viewMessage,
  type NodeContext,
  type NodeInput,
  type RpcTunnelPolicy,
 hasWorkToDrain, planDiffersFromRunning } from './node-context.ts';
import { needsRpcServer, remoteWorkers, withId, withoutId } from './node-plan.ts';
import { peerMachine, type PeerEvidence, type PeerNotice } from './peer.machine.ts';
import { unprovidedCallback } from './process-slot.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from './protocol.ts';
import { rpcServerMachine, type RpcServerCommand, type RpcServerNotice } from './rpc-server.machine.ts';
import { hungVerdict, QUARANTINE_MS, suspectsOfRunningPlan, type QuarantineOverEvent, type StageHungEvent } from './stage-health.ts';

export type NodeEvent =
  | NetworkEvent
  | ElectionPlannedEvent
  | PeerNotice
  | RpcServerNotice
  | LlamaServerNotice
  | { readonly type: 'node.stop'; readonly reason: string }
  // From the tunnels: evidence about a peer (forwarded to its peer machine), a hung stage (stage-health.ts).
  | PeerEvidence
  | StageHungEvent
  | QuarantineOverEvent
  // From the composition root: how many requests this node's APIs are answering now.
  | { readonly type: 'requests.inflight'; readonly count: number }
  // Raised internally: the mesh facts changed (gossip, links, a crash), so the election will settle anew.
  | { readonly type: 'mesh.changed' }
  // Raised internally: the election sent a plan (already in context.plan).
  | { readonly type: 'plan.elected' }
  // Raised internally every `reannounce`: re-announce self (a new seq keeps our facts fresh elsewhere), expire stale ids.
  | { readonly type: 'gossip.tick' };

type PeerRef = ActorRefFrom<typeof peerMachine>;

/** Electing waits twice the election's settle window: long enough for a burst to settle and a plan to arrive. */
export const ELECTION_QUIET_MS = SETTLE_MS * 2;

/**
 * How often a node re-announces itself (seq + 1, signed anew) to its links. Another node's facts expire after
 * VIEW_LIMITS.ttlTicks of its own ticks without a newer announcement: 6 x 30 s = 3 min.
 */
export const REANNOUNCE_MS = 30_000;

/** The bound on draining requests before a planned change (issue 12: bounded, e.g. 30 s). */
export const DRAIN_TIMEOUT_MS = 30_000;

export const nodeSetup = setup({
  types: {
    input: {} as NodeInput,
    context: {} as NodeContext,
    events: {} as NodeEvent,
  },
  actors: {
    network: unprovidedCallback<NetworkCommand, { self: EndpointId }>('network'),
    election: electionMachine,
    peer: peerMachine,
    rpcServer: rpcServerMachine,
    llamaServer: llamaServerMachine,
  },
  delays: {
    /**
     * Electing waits this long for a new plan before concluding the plan did not change (the election
     * machine only speaks when the plan id changes). Must exceed the election's `settle`.
     */
    electionQuiet: ELECTION_QUIET_MS,
    /** With a bootstrap peer, how long joining waits for the first handshake before electing alone. */
    joinTimeout: 10_000,
    /** A graceful stop gives its processes this long before the node stops them hard. */
    leaveTimeout: 10_000,
    /** A planned change (a join, a graceful leave) lets requests in flight finish for at most this long. */
    drainTimeout: DRAIN_TIMEOUT_MS,
    /** After a leaving host drained, this long before the connections close (the answers' last bytes). */
    drainLinger: 1_000,
    /** The gossip tick: re-announcement and expiry (see REANNOUNCE_MS). */
    reannounce: REANNOUNCE_MS,
    /** A stage that hung twice stays out of this host's plans this long (stage-health.ts). */
    quarantine: QUARANTINE_MS,
  },
  guards: {
    hasNoBootstrap: ({ context }) => context.bootstrap.length === 0,
    hasNoPlanYet: ({ context }) => context.plan === null,
    planDiffersFromRunning: ({ context }) => planDiffersFromRunning(context),
    planIsUp: ({ context }) => planIsUp(context),
    shouldStartRpc: ({ context }) => needsRpcServer(runningRole(context)) && context.rpc === 'down',
    shouldTellHost: ({ context }) =>
      runningRole(context) === 'worker' &&
      context.rpc === 'ready' &&
      context.running?.kind === 'ready' &&
      context.rpcReadySent !== context.running.id &&
      context.links.includes(context.running.host),
    shouldStartLlama: ({ context }) => {
      const plan = context.running;
      if (plan === null || plan.kind !== 'ready' || runningRole(context) !== 'host') return false;
      if (context.rpc !== 'ready' || context.llama !== 'down') return false;
      return remoteWorkers(plan).every((w) => context.rpcReady[w] === plan.id);
    },
    processesDown: ({ context }) => context.rpc === 'down' && context.llama === 'down',
    planChangeDrains: ({ context }) => planDiffersFromRunning(context) && hasWorkToDrain(context),
    drained: ({ context }) => !hasWorkToDrain(context),
  },
  actions: {
    // ---- peers ----------------------------------------------------------------------------------------
    spawnBootstrapPeers: enqueueActions(({ context, enqueue }) => {
      for (const b of context.bootstrap) {
        if (b.id === context.self.id || context.peers[b.id] !== undefined) continue;
        enqueue.assign(spawnPeer({ id: b.id, addrs: b.addrs, inbound: false }));
      }
    }),
    // Members removed by a rotation of the mesh secret: no link, no peer machine, not in the view (the network
    // refuses them and drops gossip about them from now on), so the next election plans without them.
    removeMembers: enqueueActions(({ context, enqueue }, params: { ids: readonly EndpointId[] }) => {
      const ids = params.ids.filter((id) => id !== context.self.id && (context.peers[id] !== undefined || context.view.announcements[id] !== undefined));
      if (ids.length === 0) return;
      const peers = { ...context.peers };
      const direct = { ...context.direct };
      const rpcReady = { ...context.rpcReady };
      for (const id of ids) {
        const ref = peers[id];
        if (ref !== undefined) enqueue.stopChild(ref);
        delete peers[id];
        delete direct[id];
        delete rpcReady[id];
      }
      const kept = forget(context.view, context.freshness, ids, context.tick);
      const next: NodeContext = { ...context, peers, direct, rpcReady, links: context.links.filter((l) => !ids.includes(l)), view: kept.view, freshness: kept.freshness };
      enqueue.assign({ peers, direct, rpcReady, links: next.links, view: next.view, freshness: next.freshness });
      enqueue.sendTo('election', { type: 'view.pruned', ids });
      announceSelf(enqueue, next);
      enqueue.raise({ type: 'mesh.changed' });
    }),
    dropPeer: enqueueActions(({ context, enqueue }, params: { id: EndpointId }) => {
      const ref = context.peers[params.id];
      if (ref !== undefined) enqueue.stopChild(ref);
      const { [params.id]: _, ...peers } = context.peers;
      const { [params.id]: __, ...direct } = context.direct;
      const epoch = context.view.announcements[params.id]?.epoch ?? -1;
      enqueue.assign({ peers, direct, departed: { ...context.departed, [params.id]: epoch } });
    }),
    forwardToPeer: enqueueActions(({ context, event, enqueue }, params: { id: EndpointId }) => {
      const ref = context.peers[params.id];
      if (ref !== undefined) enqueue.sendTo(ref, event as NetworkEvent);
    }),
    // A connection came up (we dialed, or the peer did): make sure a peer machine watches it, then start the
    // handshake by telling the peer everything we know.
    takeConnection: enqueueActions(({ context, enqueue }, params: { id: EndpointId; direct: boolean }) => {
      if (params.id === context.self.id) return;
      enqueue.assign({ direct: { ...context.direct, [params.id]: params.direct } });
      const ref = context.peers[params.id];
      if (ref === undefined) {
        const addrs = context.view.announcements[params.id]?.addrs ?? [];
        enqueue.assign(spawnPeer({ id: params.id, addrs, inbound: true }));
      } else {
        enqueue.sendTo(ref, { type: 'net.peer.connected', id: params.id, direct: params.direct } satisfies NetworkEvent);
      }
      enqueue.sendTo('network', viewMessage(context, params.id));
    }),
    linkUp: enqueueActions(({ context, enqueue }, params: { id: EndpointId }) => {
      const next = { ...context, links: withId(context.links, params.id) };
      enqueue.assign({ links: next.links });
      announceSelf(enqueue, next);
      // The peer may have missed changes of ours made while it was still handshaking.
      enqueue.sendTo('network', viewMessage(next, params.id));
      enqueue.raise({ type: 'mesh.changed' });
    }),
    linkDown: enqueueActions(({ context, enqueue }, params: { id: EndpointId }) => {
      if (!context.links.includes(params.id)) return;
      const { [params.id]: _, ...rpcReady } = context.rpcReady;
      const toldHost = context.running?.kind === 'ready' && context.running.host === params.id;
      const next = {
        ...context,
        links: withoutId(context.links, params.id),
        rpcReady,
        // A host that lost us must hear rpc-ready again once we are back.
        rpcReadySent: toldHost ? null : context.rpcReadySent,
      };
      enqueue.assign({ links: next.links, rpcReady: next.rpcReady, rpcReadySent: next.rpcReadySent });
      announceSelf(enqueue, next);
      enqueue.raise({ type: 'mesh.changed' });
    }),

    // ---- messages -------------------------------------------------------------------------------------
    takeMessage: enqueueActions(({ context, enqueue }, params: { from: EndpointId; message: MeshMessage }) => {
      const { from, message } = params;
      if (message.type === 'rpc-ready') {
        enqueue.assign({ rpcReady: { ...context.rpcReady, [from]: message.planId } });
        return;
      }
      if (message.type !== 'gossip') return; // hello, heartbeats and leaving belong to the peer machine
      // Only facts signed by their owners count (never our own: only we write it), newer than what we hold.
      const accepted = acceptGossip(context.view, context.freshness, message.announcements, {
        verify: (a) => context.facts.verify(a),
        now: context.tick,
        protect: protectedIds(context),
      });
      const { learned, refreshed, evicted } = accepted;
      if (learned.length === 0 && refreshed.length === 0 && evicted.length === 0) return;
      enqueue.assign({ view: accepted.view, freshness: accepted.freshness });
      dropUnlinked(enqueue, context, evicted);
      // Relay only to links that will not hear it from its author directly (full mesh: nobody), verbatim:
      // the owner's signature travels with it.
      const relayable = [...learned, ...refreshed];
      for (const to of context.links) {
        if (to === from) continue;
        const relay = relayable.filter((a) => a.id !== to && !mutuallyConnected(accepted.view, a.id, to));
        if (relay.length > 0) {
          enqueue.sendTo('network', { type: 'net.send', to, message: { type: 'gossip', announcements: relay } } satisfies NetworkCommand);
        }
      }
      if (learned.length === 0 && evicted.length === 0) return; // a refresh teaches the election nothing
      // A worker whose newer announcement says it no longer serves has lost its rpc-server: its old
      // rpc-ready is void.
      const rpcReady = { ...context.rpcReady };
      for (const a of learned) if (!a.serving) delete rpcReady[a.id];
      enqueue.assign({ rpcReady });
      if (learned.length > 0) enqueue.sendTo('election', { type: 'gossip.received', announcements: learned } satisfies ElectionEvent);
      // Full mesh: dial every node we learn of, except one that left in this very epoch. The view is bounded,
      // so is this dial set.
      for (const a of learned) {
        if (context.peers[a.id] !== undefined) continue;
        const leftIn = context.departed[a.id];
        if (leftIn !== undefined && a.epoch <= leftIn) continue;
        enqueue.assign(spawnPeer({ id: a.id, addrs: a.addrs, inbound: false }));
      }
      enqueue.raise({ type: 'mesh.changed' });
    }),

    // The periodic tick: facts nobody refreshed for the TTL leave the view (and their dialing stops), and
    // this node re-announces itself so that it stays fresh in everyone else's view.
    tickGossip: enqueueActions(({ context, enqueue }) => {
      const tick = context.tick + 1;
      const expired = expireStale(context.view, context.freshness, { now: tick, protect: protectedIds(context) });
      const next: NodeContext = { ...context, tick, view: expired.view, freshness: expired.freshness };
      enqueue.assign({ tick, view: next.view, freshness: next.freshness });
      if (expired.expired.length > 0) {
        dropUnlinked(enqueue, context, expired.expired);
        enqueue.raise({ type: 'mesh.changed' });
      }
      announceSelf(enqueue, next, true);
      enqueue.raise({ type: 'gossip.tick' }, { delay: 'reannounce' });
    }),

    // ---- own announcement ------------------------------------------------------------------------------
    refreshSelf: enqueueActions(({ context, enqueue }) => announceSelf(enqueue, context)),

    // ---- plan -----------------------------------------------------------------------------------------
    takePlan: assign((_, params: { plan: Plan }) => ({ plan: params.plan })),
    // Entering starting: run the latest plan. A new plan admits nobody until we tell its host rpc-ready.
    adoptPlan: assign(({ context }) => {
      const running = context.plan;
      const changed = running?.id !== context.running?.id;
      return {
        running,
        rpcTunnelPolicy: changed ? null : context.rpcTunnelPolicy,
        rpcReadySent: changed ? null : context.rpcReadySent,
      };
    }),
    startRpc: enqueueActions(({ enqueue }) => {
      enqueue.assign({ rpc: 'starting' });
      enqueue.sendTo('rpcServer', { type: 'rpc.start' } satisfies RpcServerCommand);
    }),
    // The policy opens for exactly the host we tell, for this plan and this rpc-server: a host acting on an
    // rpc-ready of an earlier rpc-server (or plan) finds its tunnel refused.
    tellHostRpcReady: enqueueActions(({ context, enqueue }) => {
      const plan = context.running;
      if (plan === null || plan.kind !== 'ready') return;
      const rpcTunnelPolicy: RpcTunnelPolicy = { host: plan.host, planId: plan.id };
      enqueue.assign({ rpcReadySent: plan.id, rpcTunnelPolicy });
      enqueue.sendTo('network', {
        type: 'net.send',
        to: plan.host,
        message: { type: 'rpc-ready', planId: plan.id },
      } satisfies NetworkCommand);
    }),
    startLlama: enqueueActions(({ context, enqueue }) => {
      const plan = context.running;
      if (plan === null || plan.kind !== 'ready' || context.rpcPort === null) return;
      const generation = context.generation + 1;
      enqueue.assign({ llama: 'starting', generation });
      enqueue.sendTo('llamaServer', { type: 'llama.start', plan, generation, ownRpcPort: context.rpcPort } satisfies LlamaServerCommand);
    }),
    // Kill what runs; nothing may reach our rpc-server meanwhile.
    stopProcesses: enqueueActions(({ context, enqueue }) => {
      enqueue.assign({ rpcTunnelPolicy: null, rpcReadySent: null });
      if (context.llama !== 'down') {
        enqueue.assign({ llama: 'stopping' });
        enqueue.sendTo('llamaServer', { type: 'llama.stop' } satisfies LlamaServerCommand);
      }
      if (context.rpc !== 'down') {
        enqueue.assign({ rpc: 'stopping' });
        enqueue.sendTo('rpcServer', { type: 'rpc.stop' } satisfies RpcServerCommand);
      }
    }),
    // Only llama-server (the host's own rpc-server crashed under it).
    stopLlama: enqueueActions(({ context, enqueue }) => {
      if (context.llama === 'down' || context.llama === 'stopping') return;
      enqueue.assign({ llama: 'stopping' });
      enqueue.sendTo('llamaServer', { type: 'llama.stop' } satisfies LlamaServerCommand);
    }),
    sayLeaving: enqueueActions(({ context, enqueue }) => {
      for (const to of context.links) {
        enqueue.sendTo('network', { type: 'net.send', to, message: { type: 'leaving', reason: context.stopReason ?? 'stopping' } } satisfies NetworkCommand);
      }
    }),
    noteStopReason: assign((_, params: { reason: string }) => ({ stopReason: params.reason })),
    // ---- stage health (stage-health.ts) -----------------------------------------------------------------
    // A hung stage: the 1st strike makes it a suspect, the 2nd quarantines it; either way llama-server stops (the
    // request in flight ends) and the node re-elects, which starts it again (or plans without the stage).
    takeHungStage: enqueueActions(({ context, enqueue }, params: { event: StageHungEvent }) => {
      const verdict = hungVerdict(context, params.event);
      if (verdict === 'ignore') return;
      const { id } = params.event;
      if (verdict === 'suspect') enqueue.assign({ suspects: { ...context.suspects, [id]: context.running!.id } });
      else quarantine(enqueue, context, [id]);
      if (context.llama === 'ready' || context.llama === 'starting') {
        enqueue.assign({ llama: 'stopping' });
        enqueue.sendTo('llamaServer', { type: 'llama.stop' } satisfies LlamaServerCommand);
      }
      enqueue.raise({ type: 'mesh.changed' });
    }),
    // llama-server restarted after a strike and did not get ready: the suspects stayed silent.
    quarantineSuspects: enqueueActions(({ context, enqueue }) => {
      const ids = suspectsOfRunningPlan(context);
      if (ids.length > 0) quarantine(enqueue, context, ids);
    }),
    // llama-server got ready: every stage answered.
    clearSuspects: assign({ suspects: {} }),
    endQuarantine: enqueueActions(({ context, enqueue }, params: { id: EndpointId }) => {
      if (!context.quarantined.includes(params.id)) return;
      const { [params.id]: _, ...suspects } = context.suspects;
      const next = { ...context, quarantined: withoutId(context.quarantined, params.id), suspects };
      enqueue.assign({ quarantined: next.quarantined, suspects });
      announceSelf(enqueue, next);
      enqueue.raise({ type: 'mesh.changed' });
    }),
    countInFlight: assign((_, params: { count: number }) => ({ inFlight: Math.max(0, params.count) })),

    // ---- process notices ------------------------------------------------------------------------------
    rpcUp: assign((_, params: { port: number }) => ({ rpc: 'ready' as const, rpcPort: params.port })),
    // An rpc-ready we sent spoke for the rpc-server that just went away: the next one must be told anew, and
    // until then nobody may reach it.
    rpcDown: assign({ rpc: 'down' as const, rpcPort: null, rpcReadySent: null, rpcTunnelPolicy: null }),
    llamaUp: assign((_, params: { port: number }) => ({ llama: 'ready' as const, llamaPort: params.port })),
    llamaDown: assign({ llama: 'down' as const, llamaPort: null }),
    raiseMeshChanged: raise({ type: 'mesh.changed' }),
    raisePlanElected: raise({ type: 'plan.elected' }),
  },
});

/** What `enqueueActions` offers that the helpers below use. */
interface NodeEnqueue {
  assign(update: Partial<NodeContext>): void;
  raise(event: QuarantineOverEvent, options: { id: string; delay: 'quarantine' }): void;
  stopChild(ref: AnyActorRef): void;
  sendTo(target: 'network', event: NetworkCommand): void;
  sendTo(target: 'election', event: ElectionEvent): void;
}

/** Leaves `ids` out of this host's announcement (so out of every plan) for `quarantine`, then takes them back. */
function quarantine(enqueue: NodeEnqueue, context: NodeContext, ids: readonly EndpointId[]): void {
  let quarantined = context.quarantined;
  for (const id of ids) quarantined = withId(quarantined, id);
  const suspects = { ...context.suspects };
  for (const id of ids) delete suspects[id];
  const next = { ...context, quarantined, suspects };
  enqueue.assign({ quarantined, suspects });
  announceSelf(enqueue, next);
  for (const id of ids) {
    enqueue.raise({ type: 'stage.quarantine.over', id } satisfies QuarantineOverEvent, { id: `quarantine:${id}`, delay: 'quarantine' });
  }
}

/** Spawns the machine that watches one peer (an assigner for `enqueue.assign`). */
function spawnPeer(params: { id: EndpointId; addrs: readonly string[]; inbound: boolean }) {
  return ({ context, spawn, self, system }: { context: NodeContext; spawn: (src: 'peer', options: object) => AnyActorRef; self: AnyActorRef; system: { get(id: string): unknown } }) => {
    const network = system.get('network') as AnyActorRef;
    const ref = spawn('peer', {
      id: `peer:${params.id}`,
      systemId: `peer:${params.id}`,
      input: { id: params.id, addrs: params.addrs, network, notify: self, inbound: params.inbound },
    }) as PeerRef;
    const { [params.id]: _, ...departed } = context.departed;
    return { peers: { ...context.peers, [params.id]: ref }, departed };
  };
}

/**
 * Ids whose facts left the view (expired or evicted): the election forgets them too, and nobody dials them any
 * more unless they are linked (a link is protected from both, so this is for dialing that has not succeeded).
 */
function dropUnlinked(enqueue: NodeEnqueue, context: NodeContext, ids: readonly EndpointId[]): void {
  if (ids.length === 0) return;
  enqueue.sendTo('election', { type: 'view.pruned', ids });
  const peers = { ...context.peers };
  const direct = { ...context.direct };
  for (const id of ids) {
    const ref = peers[id];
    if (ref === undefined || context.links.includes(id)) continue;
    enqueue.stopChild(ref);
    delete peers[id];
    delete direct[id];
  }
  enqueue.assign({ peers, direct });
}

/**
 * Recomputes what this node announces (direct links, serving); on a change (or a `refresh`) raises seq, signs
 * it and tells every link, and the election when a fact changed.
 */
function announceSelf(enqueue: NodeEnqueue, context: NodeContext, refresh = false): void {
  const next = nextSelf(context, refresh);
  if (next === null) return;
  const { self } = next;
  enqueue.assign(next);
  if (!sameFacts(self, context.self)) enqueue.sendTo('election', { type: 'self.changed', announcement: self });
  for (const to of context.links) {
    enqueue.sendTo('network', { type: 'net.send', to, message: { type: 'gossip', announcements: [self] } });
  }
}
