// The root of one mesh node: joining -> electing -> starting -> serving; a mesh change re-elects, and only a
// plan that differs from the running one goes stopping (kill) -> starting (fresh start). Pure: time only
// through XState delays, the world only through actor slots.
//
// It owns (one owner each): the `network` actor (slot, see below), the `election` machine, one `peer` machine
// per remote peer (spawned, systemId `peer:<id>`, stopped and dropped when the peer leaves), the `rpcServer`
// machine (every node that is a stage of its plan) and the `llamaServer` machine (process only on the host).
//
// Slot `network` (fromCallback, src/actors/mesh-network.actor.ts): input { self: EndpointId }; receives every
// NetworkCommand of protocol.ts and sends back NetworkEvents. Expected behaviour: `net.dial` of a peer that is
// already connected answers `net.peer.connected` again; `net.send` to a peer without a connection is dropped
// (the peer machines notice through heartbeats); messages on one connection arrive in order.
// Slots `rpcServer`, `llamaServer`, `election`, `peer` default to the machines of this folder; the composition
// root provides their own process slots (`rpcServerMachine.provide(...)`) and passes them in here.
//
// Hand-off (ARCHITECTURE.md): `rpcTunnelPolicy` in the context names the only host, and the only plan, whose
// rpc tunnels this node's rpc-server accepts (null: none). A worker sets it at the moment it tells its plan's
// host `rpc-ready {planId}` (after a fresh rpc-server came up), and clears it when the plan changes or the
// rpc-server goes down. The tunnel layer watches it, admits a tunnel only from that host and only when the
// host names that plan id as it opens the stream (tunnel-policy.ts), and closes every other tunnel at once. So a host
// acting on an rpc-ready of our previous rpc-server, or of another plan, is refused. A host starts
// llama-server only when every remote stage said rpc-ready for the plan it runs.
import { not, raise } from 'xstate';
import { initialNodeContext } from './node-context.ts';
import { nodeSetup } from './node-setup.ts';

// The events, delays, guards and actions live in node-setup.ts; this file is the shape of states and transitions.
export type { NodeEvent } from './node-setup.ts';
export { DRAIN_TIMEOUT_MS, ELECTION_QUIET_MS, REANNOUNCE_MS } from './node-setup.ts';
// The context and what derives from it live in node-context.ts; its readers may import them from here too.
export type { BootstrapPeer, NodeContext, NodeInput, ProcessState, RpcTunnelPolicy } from './node-context.ts';
export { planIsUp, runningRole } from './node-context.ts';

export const nodeMachine = nodeSetup.createMachine({
  id: 'node',
  context: ({ input }) => initialNodeContext(input),
  entry: raise({ type: 'gossip.tick' }, { delay: 'reannounce' }),
  invoke: [
    {
      id: 'network',
      systemId: 'network',
      src: 'network',
      input: ({ context }) => ({ self: context.self.id }),
      onError: {
        target: '.leaving',
        actions: { type: 'noteStopReason', params: ({ event }) => ({ reason: `network failed: ${String(event.error)}` }) },
      },
    },
    {
      id: 'election',
      src: 'election',
      input: ({ context, self }) => ({ self: context.self, notify: self }),
      onError: {
        target: '.leaving',
        actions: { type: 'noteStopReason', params: ({ event }) => ({ reason: `election failed: ${String(event.error)}` }) },
      },
    },
    {
      id: 'rpcServer',
      src: 'rpcServer',
      input: ({ self }) => ({ notify: self }),
      onError: {
        target: '.leaving',
        actions: { type: 'noteStopReason', params: ({ event }) => ({ reason: `rpc-server machine failed: ${String(event.error)}` }) },
      },
    },
    {
      id: 'llamaServer',
      src: 'llamaServer',
      input: ({ self }) => ({ notify: self }),
      onError: {
        target: '.leaving',
        actions: { type: 'noteStopReason', params: ({ event }) => ({ reason: `llama-server machine failed: ${String(event.error)}` }) },
      },
    },
  ],
  on: {
    'gossip.tick': { actions: 'tickGossip' },
    'net.peer.connected': {
      actions: { type: 'takeConnection', params: ({ event }) => ({ id: event.id, direct: event.direct }) },
    },
    'net.peer.disconnected': { actions: { type: 'forwardToPeer', params: ({ event }) => ({ id: event.id }) } },
    'net.peers.removed': { actions: { type: 'removeMembers', params: ({ event }) => ({ ids: event.ids }) } },
    'net.message': {
      actions: [
        { type: 'forwardToPeer', params: ({ event }) => ({ id: event.from }) },
        { type: 'takeMessage', params: ({ event }) => ({ from: event.from, message: event.message }) },
      ],
    },
    'peer.up': { actions: { type: 'linkUp', params: ({ event }) => ({ id: event.id }) } },
    'peer.down': { actions: { type: 'linkDown', params: ({ event }) => ({ id: event.id }) } },
    'peer.left': {
      actions: [
        { type: 'linkDown', params: ({ event }) => ({ id: event.id }) },
        { type: 'dropPeer', params: ({ event }) => ({ id: event.id }) },
      ],
    },
    'election.planned': {
      actions: [{ type: 'takePlan', params: ({ event }) => ({ plan: event.plan }) }, 'raisePlanElected'],
    },
    'rpc.ready': { actions: [{ type: 'rpcUp', params: ({ event }) => ({ port: event.port }) }, 'refreshSelf'] },
    'rpc.stopped': { actions: ['rpcDown', 'refreshSelf'] },
    // A crash is a mesh change like any other. The host's llama-server holds a connection to the rpc-server that
    // is gone (its next request would crash it): it restarts with the new one.
    'rpc.crashed': { actions: ['rpcDown', 'stopLlama', 'refreshSelf', 'raiseMeshChanged'] },
    'llama.ready': { actions: [{ type: 'llamaUp', params: ({ event }) => ({ port: event.port }) }, 'clearSuspects', 'refreshSelf'] },
    'llama.stopped': { actions: ['llamaDown', 'refreshSelf'] },
    // After a hung stage's strike, a restart that crashes means the stage stayed silent (stage-health.ts).
    'llama.crashed': { actions: ['llamaDown', 'quarantineSuspects', 'refreshSelf', 'raiseMeshChanged'] },
    // The tunnels' word about a peer and its stage.
    'peer.evidence': { actions: { type: 'forwardToPeer', params: ({ event }) => ({ id: event.id }) } },
    'stage.hung': { actions: { type: 'takeHungStage', params: ({ event }) => ({ event }) } },
    'stage.quarantine.over': { actions: { type: 'endQuarantine', params: ({ event }) => ({ id: event.id }) } },
    'requests.inflight': { actions: { type: 'countInFlight', params: ({ event }) => ({ count: event.count }) } },
    'node.stop': {
      target: '.leaving',
      actions: { type: 'noteStopReason', params: ({ event }) => ({ reason: event.reason }) },
    },
  },
  initial: 'joining',
  states: {
    // Dial the invite's node and wait for the first handshake, so that the first election already sees
    // the mesh (electing alone first would start processes only to kill them a moment later).
    joining: {
      entry: 'spawnBootstrapPeers',
      always: { guard: 'hasNoBootstrap', target: 'electing' },
      on: { 'mesh.changed': 'electing' },
      after: { joinTimeout: 'electing' },
    },
    // The election settles the burst of changes. A new plan arrives as `plan.elected`; silence past
    // `electionQuiet` means the plan did not change.
    electing: {
      on: {
        'plan.elected': [{ guard: 'planChangeDrains', target: 'draining' }, { guard: 'planDiffersFromRunning', target: 'stopping' }, { target: 'starting' }],
      },
      after: {
        electionQuiet: [
          { guard: 'hasNoPlanYet' }, // the first plan is on its way: the election always sends it
          { guard: 'planChangeDrains', target: 'draining' },
          { guard: 'planDiffersFromRunning', target: 'stopping' },
          { guard: not('hasNoPlanYet'), target: 'starting' },
        ],
      },
    },
    // Bring up what the plan needs for this node; idempotent, so a mesh change midway costs nothing.
    starting: {
      entry: 'adoptPlan',
      always: [
        { guard: 'planIsUp', target: 'serving' },
        { guard: 'shouldStartRpc', actions: 'startRpc' },
        { guard: 'shouldTellHost', actions: 'tellHostRpcReady' },
        { guard: 'shouldStartLlama', actions: 'startLlama' },
      ],
      on: {
        'mesh.changed': 'electing',
        'plan.elected': { guard: 'planDiffersFromRunning', target: 'stopping' },
      },
    },
    serving: {
      on: {
        'mesh.changed': 'electing',
        'plan.elected': [{ guard: 'planChangeDrains', target: 'draining' }, { guard: 'planDiffersFromRunning', target: 'stopping' }],
      },
    },
    // A planned change (a join, a graceful leave elsewhere): what runs now finishes first, bounded; new requests
    // wait for the new plan (the API routes only a serving node). A stage that dies meanwhile ends it at once.
    draining: {
      always: { guard: 'drained', target: 'stopping' },
      after: { drainTimeout: 'stopping' },
      // The change went away again (the newcomer left): nothing to restart.
      on: { 'plan.elected': { guard: not('planDiffersFromRunning'), target: 'starting' } },
    },
    // Kill everything of the old plan, then start the new one from scratch.
    stopping: {
      entry: 'stopProcesses',
      always: { guard: 'processesDown', target: 'starting' },
    },
    // A graceful stop: a host first lets its requests in flight finish (bounded), then tells the peers, stops
    // the processes, and stops for good.
    leaving: {
      initial: 'checking',
      states: {
        checking: {
          always: [{ guard: 'drained', target: 'going' }, { target: 'draining' }],
        },
        draining: {
          always: { guard: 'drained', target: 'lingering' },
          after: { drainTimeout: 'going' },
        },
        // The last bytes of the answers just finished are still on their way through the tunnels.
        lingering: {
          after: { drainLinger: 'going' },
        },
        going: {
          entry: ['sayLeaving', 'stopProcesses'],
          always: { guard: 'processesDown', target: '#node.stopped' },
          after: { leaveTimeout: '#node.stopped' },
        },
      },
      on: {
        'node.stop': {},
        'gossip.tick': {},
        'mesh.changed': {},
        'plan.elected': {},
      },
    },
    // Final: every child actor stops with the node, and each process slot's cleanup kills its process.
    stopped: { type: 'final' },
  },
});
