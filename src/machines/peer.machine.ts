// One remote peer as this node sees it: dialing -> handshaking -> connected <-> suspect -> gone (the link is
// lost; redial with backoff, since partitions heal) and `left` (final: the peer said `leaving`).
// Pure: time only through XState delays; it talks to the network actor and to its owner through refs in input.
//
// Input: { id, addrs, network, notify, inbound? }. The owner (the node machine) forwards to it every
// `net.peer.connected` / `net.peer.disconnected` / `net.message` concerning this peer. It sends
// `net.dial`, `net.close` and `net.send` (heartbeat, heartbeat-ack) to `network`, and tells `notify`:
//   `peer.up {id}`    the handshake finished (the peer's first message arrived): count it as connected;
//   `peer.down {id}`  the link is lost (disconnected, or silent for `goneAfter`);
//   `peer.left {id, reason}`  the peer said `leaving`: stop and drop this actor.
// The owner sends the handshake's gossip itself (it owns the view) when it sees `net.peer.connected`.
//
// Liveness: a heartbeat every `heartbeatInterval` (500 ms); any message from the peer (heartbeat, ack,
// gossip...) proves it alive. Silent for `suspectAfter` (1.25 s: two heartbeats and their acks missed) ->
// suspect; silent for `goneAfter` (2.5 s: five missed each way) -> gone, so a dead peer is noticed within 2.5 s
// of its last message (the bound is 3 s). Both timers are delayed events re-armed on every message,
// so the heartbeat cadence never resets them. Why these numbers: docs/node.md, "Noticing a dead peer".
//
// Evidence from the data path (`peer.evidence`, from the node's tunnels): `quic`, a tunnel's QUIC connection
// failed (authenticated: nobody on the path can forge it) -> gone at once; `direct`, a direct TCP + TLS data
// connection was reset (anyone on the path, or a NAT, can do that) -> gone only together with missed
// heartbeats: at once while suspect, else it is remembered until the next message from the peer clears it,
// and entering suspect with it remembered is gone.
import { assign, enqueueActions, not, raise, sendTo, setup, type AnyActorRef } from 'xstate';
import type { EndpointId } from './mesh-types.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from './protocol.ts';

export interface PeerInput {
  readonly id: EndpointId;
  readonly addrs: readonly string[];
  /** The network actor (receives NetworkCommand). */
  readonly network: AnyActorRef;
  /** The owner (the node machine). */
  readonly notify: AnyActorRef;
  /** The peer dialed us: its connection is already up, so skip dialing. */
  readonly inbound?: boolean;
}

/** What the owner hears. */
export type PeerNotice =
  | { readonly type: 'peer.up'; readonly id: EndpointId }
  | { readonly type: 'peer.down'; readonly id: EndpointId; readonly reason: string }
  | { readonly type: 'peer.left'; readonly id: EndpointId; readonly reason: string };

/** Timer events the machine raises to itself (delayed). */
type PeerTimerEvent =
  | { readonly type: 'peer.heartbeat.due' }
  | { readonly type: 'peer.silence.suspect' }
  | { readonly type: 'peer.silence.gone' };

/** What the data path saw of this peer (the owner forwards the tunnels' reports): see the file header. */
export interface PeerEvidence {
  readonly type: 'peer.evidence';
  readonly id: EndpointId;
  readonly path: 'quic' | 'direct';
  readonly why: string;
}

export type PeerEvent = NetworkEvent | PeerTimerEvent | PeerEvidence;

export interface PeerContext {
  readonly id: EndpointId;
  readonly addrs: readonly string[];
  readonly network: AnyActorRef;
  readonly notify: AnyActorRef;
  readonly inbound: boolean;
  /** Failed dial/handshake rounds since the link was last up: drives the backoff. */
  readonly attempts: number;
  /** Number of the last heartbeat sent. */
  readonly beat: number;
  /** Why the link went down last, for people reading the inspector. */
  readonly lastDownReason: string | null;
  /** A direct data connection was reset since the peer's last message: weak evidence, waiting for silence. */
  readonly directReset: string | null;
}

// Timer ids for `cancel`.
const HEARTBEAT = 'heartbeat';
const SUSPECT = 'silence.suspect';
const GONE = 'silence.gone';

/** The liveness bounds (the machine's default delays; .provide({ delays }) overrides them). */
export const HEARTBEAT_INTERVAL_MS = 500;
export const SUSPECT_AFTER_MS = 1_250;
export const GONE_AFTER_MS = 2_500;

export const RECONNECT_BASE_MS = 1_000;
export const RECONNECT_CAP_MS = 16_000;

export const peerMachine = setup({
  types: {
    input: {} as PeerInput,
    context: {} as PeerContext,
    events: {} as PeerEvent,
  },
  delays: {
    heartbeatInterval: HEARTBEAT_INTERVAL_MS,
    suspectAfter: SUSPECT_AFTER_MS,
    goneAfter: GONE_AFTER_MS,
    /** A dial that has not connected by then has failed. */
    dialTimeout: 5_000,
    /** A connection whose first message has not come by then has failed. */
    handshakeTimeout: 5_000,
    /** Exponential, capped: 1 s, 2 s, 4 s ... 16 s. */
    reconnectBackoff: ({ context }: { context: PeerContext }) =>
      Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** Math.min(context.attempts, 8)),
  },
  guards: {
    isInbound: ({ context }) => context.inbound,
    isLeaving: (_, params: { message: MeshMessage }) => params.message.type === 'leaving',
    // State-level message handlers would shadow the machine-level `leaving` one: they take only the rest.
    isNotLeaving: (_, params: { message: MeshMessage }) => params.message.type !== 'leaving',
    hasDirectReset: ({ context }) => context.directReset !== null,
    isQuicEvidence: (_, params: { path: 'quic' | 'direct' }) => params.path === 'quic',
    isDirectEvidence: (_, params: { path: 'quic' | 'direct' }) => params.path === 'direct',
  },
  actions: {
    dial: sendTo(
      ({ context }) => context.network,
      ({ context }): NetworkCommand => ({ type: 'net.dial', id: context.id, addrs: context.addrs }),
    ),
    closeLink: sendTo(
      ({ context }) => context.network,
      ({ context }): NetworkCommand => ({ type: 'net.close', id: context.id, reason: context.lastDownReason ?? 'peer gone' }),
    ),
    countAttempt: assign(({ context }) => ({ attempts: context.attempts + 1 })),
    resetAttempts: assign({ attempts: 0 }),
    noteDown: assign((_, params: { reason: string }) => ({ lastDownReason: params.reason })),
    // Heartbeats run on their own delayed event so that state changes (connected <-> suspect) never reset them.
    scheduleHeartbeat: raise({ type: 'peer.heartbeat.due' }, { id: HEARTBEAT, delay: 'heartbeatInterval' }),
    sendHeartbeat: enqueueActions(({ context, enqueue }) => {
      const beat = context.beat + 1;
      enqueue.assign({ beat });
      enqueue.sendTo(context.network, {
        type: 'net.send',
        to: context.id,
        message: { type: 'heartbeat', n: beat },
      } satisfies NetworkCommand);
    }),
    noteDirectReset: assign((_, params: { why: string }) => ({ directReset: params.why })),
    armSilenceTimers: enqueueActions(({ enqueue }) => {
      // A message proves the peer alive: an earlier reset of a direct connection was not its death.
      enqueue.assign({ directReset: null });
      enqueue.cancel(SUSPECT);
      enqueue.cancel(GONE);
      enqueue.raise({ type: 'peer.silence.suspect' }, { id: SUSPECT, delay: 'suspectAfter' });
      enqueue.raise({ type: 'peer.silence.gone' }, { id: GONE, delay: 'goneAfter' });
    }),
    stopTimers: enqueueActions(({ enqueue }) => {
      enqueue.cancel(HEARTBEAT);
      enqueue.cancel(SUSPECT);
      enqueue.cancel(GONE);
    }),
    answerHeartbeat: enqueueActions(({ context, enqueue }, params: { message: MeshMessage }) => {
      if (params.message.type !== 'heartbeat') return;
      enqueue.sendTo(context.network, {
        type: 'net.send',
        to: context.id,
        message: { type: 'heartbeat-ack', n: params.message.n },
      } satisfies NetworkCommand);
    }),
    notifyUp: sendTo(({ context }) => context.notify, ({ context }): PeerNotice => ({ type: 'peer.up', id: context.id })),
    notifyDown: sendTo(
      ({ context }) => context.notify,
      ({ context }): PeerNotice => ({ type: 'peer.down', id: context.id, reason: context.lastDownReason ?? 'link lost' }),
    ),
    notifyLeft: sendTo(
      ({ context }) => context.notify,
      ({ context }): PeerNotice => ({ type: 'peer.left', id: context.id, reason: context.lastDownReason ?? 'left' }),
    ),
  },
}).createMachine({
  id: 'peer',
  context: ({ input }) => ({
    id: input.id,
    addrs: input.addrs,
    network: input.network,
    notify: input.notify,
    inbound: input.inbound ?? false,
    attempts: 0,
    beat: 0,
    lastDownReason: null,
    directReset: null,
  }),
  initial: 'starting',
  on: {
    // A `leaving` is final wherever it arrives; its reason is the peer's own words.
    'net.message': {
      guard: { type: 'isLeaving', params: ({ event }) => ({ message: event.message }) },
      target: '.left',
      actions: {
        type: 'noteDown',
        params: ({ event }) => ({ reason: event.message.type === 'leaving' ? `left: ${event.message.reason}` : 'left' }),
      },
    },
  },
  states: {
    // Where to begin depends only on input, so this choice cannot loop.
    starting: {
      always: [
        { guard: 'isInbound', target: 'handshaking' },
        { guard: not('isInbound'), target: 'dialing' },
      ],
    },
    dialing: {
      entry: 'dial',
      on: {
        'net.peer.connected': 'handshaking',
        // The link is evidently up: the connect event was only overtaken.
        'net.message': {
          guard: { type: 'isNotLeaving', params: ({ event }) => ({ message: event.message }) },
          target: 'up',
          actions: { type: 'answerHeartbeat', params: ({ event }) => ({ message: event.message }) },
        },
      },
      after: {
        dialTimeout: { target: 'gone', actions: ['countAttempt', { type: 'noteDown', params: { reason: 'dial timed out' } }] },
      },
    },
    handshaking: {
      on: {
        'net.message': {
          guard: { type: 'isNotLeaving', params: ({ event }) => ({ message: event.message }) },
          target: 'up',
          actions: { type: 'answerHeartbeat', params: ({ event }) => ({ message: event.message }) },
        },
        'net.peer.disconnected': {
          target: 'gone',
          actions: ['countAttempt', { type: 'noteDown', params: ({ event }) => ({ reason: event.reason }) }],
        },
      },
      after: {
        handshakeTimeout: {
          target: 'gone',
          actions: ['countAttempt', { type: 'noteDown', params: { reason: 'handshake timed out' } }],
        },
      },
    },
    up: {
      entry: ['resetAttempts', 'notifyUp', 'scheduleHeartbeat', 'armSilenceTimers'],
      exit: ['stopTimers', 'notifyDown'],
      on: {
        'peer.heartbeat.due': { actions: ['sendHeartbeat', 'scheduleHeartbeat'] },
        'peer.silence.gone': {
          target: 'gone',
          actions: { type: 'noteDown', params: { reason: 'silent for goneAfter (missed heartbeats)' } },
        },
        'net.peer.disconnected': {
          target: 'gone',
          actions: { type: 'noteDown', params: ({ event }) => ({ reason: event.reason }) },
        },
        // The QUIC connection under a tunnel failed: evidence enough on its own.
        'peer.evidence': {
          guard: { type: 'isQuicEvidence', params: ({ event }) => ({ path: event.path }) },
          target: 'gone',
          actions: { type: 'noteDown', params: ({ event }) => ({ reason: `a tunnel's QUIC connection failed: ${event.why}` }) },
        },
        // A new connection while ours looks alive: the peer restarted (or redialed) and the old connection is
        // dead. Whatever we told the old one is void, so go down and handshake anew.
        'net.peer.connected': {
          target: 'handshaking',
          actions: { type: 'noteDown', params: { reason: 'replaced by a new connection' } },
        },
      },
      initial: 'connected',
      states: {
        connected: {
          on: {
            'peer.silence.suspect': 'suspect',
            // A reset direct connection alone proves nothing: remember it until silence (or a message) decides.
            'peer.evidence': {
              guard: { type: 'isDirectEvidence', params: ({ event }) => ({ path: event.path }) },
              actions: { type: 'noteDirectReset', params: ({ event }) => ({ why: event.why }) },
            },
            'net.message': {
              guard: { type: 'isNotLeaving', params: ({ event }) => ({ message: event.message }) },
              actions: ['armSilenceTimers', { type: 'answerHeartbeat', params: ({ event }) => ({ message: event.message }) }],
            },
          },
        },
        suspect: {
          // Missed heartbeats and a reset direct connection together: gone now, not at goneAfter.
          always: {
            guard: 'hasDirectReset',
            target: '#peer.gone',
            actions: {
              type: 'noteDown',
              params: ({ context }) => ({ reason: `missed heartbeats and a reset direct connection (${context.directReset})` }),
            },
          },
          on: {
            'peer.evidence': {
              target: '#peer.gone',
              actions: { type: 'noteDown', params: ({ event }) => ({ reason: `missed heartbeats and a reset direct connection (${event.why})` }) },
            },
            'net.message': {
              guard: { type: 'isNotLeaving', params: ({ event }) => ({ message: event.message }) },
              target: 'connected',
              actions: ['armSilenceTimers', { type: 'answerHeartbeat', params: ({ event }) => ({ message: event.message }) }],
            },
          },
        },
      },
    },
    gone: {
      entry: 'closeLink',
      on: {
        // The peer dialed us (it came back, or the partition healed).
        'net.peer.connected': 'handshaking',
      },
      after: {
        reconnectBackoff: 'dialing',
      },
    },
    left: {
      type: 'final',
      entry: ['closeLink', 'notifyLeft'],
    },
  },
});
