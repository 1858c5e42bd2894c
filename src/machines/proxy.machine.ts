// Where one API request goes: the local llama-server (this node hosts and it is ready), the host over the
// mesh (worker, standby, lite client), a bounded wait while the mesh restarts, or a refusal with a reason.
// Pure: one machine per request; the API layer forwards the request to the decided route.
//
// Input: { facts: RouteFacts } (from `routeFacts(nodeSnapshot)`) and the request's `origin`, output: the Route
// once decided. `origin: 'mesh'`: the request came in through the http tunnel (the host's mesh listener), so
// it is served by this node's own llama-server or refused, never forwarded again: two nodes whose plans
// disagree for a moment must not bounce a request between them.
// Slot `watchMesh` (fromCallback, input {}): while the request waits, sends `mesh.updated {facts}` whenever
// the node's snapshot changes (the composition root subscribes to the node actor).
import { assign, setup, type EventObject } from 'xstate';
import type { EndpointId, Plan } from './mesh-types.ts';
import { roleIn } from './node-plan.ts';
import { unprovidedCallback } from './process-slot.ts';

/** What routing needs to know about the node, read from its snapshot. */
export interface RouteFacts {
  readonly self: EndpointId;
  /** The plan the node runs (null: none elected yet). */
  readonly plan: Plan | null;
  /** Whether the node has settled into its plan (its state is `serving`). */
  readonly settled: boolean;
  /** The local llama-server's port, when it is ready. */
  readonly llamaPort: number | null;
  /** Peers with a live link: the host must be one of them to forward over the mesh. */
  readonly links: readonly EndpointId[];
}

export type Route =
  | { readonly kind: 'local'; readonly port: number }
  | { readonly kind: 'remote'; readonly host: EndpointId }
  | { readonly kind: 'refused'; readonly status: 503; readonly reason: string; readonly retryAfterS: number };

/** Where a request came from: a client of this node's API, or another node through the http tunnel. */
export type RequestOrigin = 'client' | 'mesh';

/** The refusal of a request that came over the mesh to a node that does not host (it is never forwarded). */
export const NOT_HOST_REASON = 'this node does not host the model now (a request that came over the mesh is not forwarded again); try again shortly';

/** A decision, or `null` for "not yet: the mesh is restarting". Pure. */
export function decideRoute(facts: RouteFacts, origin: RequestOrigin = 'client'): Route | null {
  const { plan } = facts;
  if (plan === null) return null;
  if (plan.kind === 'waiting') return { kind: 'refused', status: 503, reason: plan.reason, retryAfterS: 30 };
  const hosts = roleIn(plan, facts.self) === 'host';
  if (origin === 'mesh' && !hosts) return { kind: 'refused', status: 503, reason: NOT_HOST_REASON, retryAfterS: 2 };
  if (!facts.settled) return null;
  if (hosts) return facts.llamaPort === null ? null : { kind: 'local', port: facts.llamaPort };
  return facts.links.includes(plan.host) ? { kind: 'remote', host: plan.host } : null;
}

/** The facts of a node snapshot (structurally: anything with the node machine's context and `matches`). */
export function routeFacts(snapshot: {
  context: { self: { id: EndpointId }; running: Plan | null; llamaPort: number | null; links: readonly EndpointId[] };
  matches: (state: 'serving') => boolean;
}): RouteFacts {
  const { context } = snapshot;
  return {
    self: context.self.id,
    plan: context.running,
    settled: snapshot.matches('serving'),
    llamaPort: context.llamaPort,
    links: context.links,
  };
}

export type ProxyEvent = { readonly type: 'mesh.updated'; readonly facts: RouteFacts };

export const proxyMachine = setup({
  types: {
    input: {} as { facts: RouteFacts; origin?: RequestOrigin },
    context: {} as { facts: RouteFacts; origin: RequestOrigin; route: Route | null },
    events: {} as ProxyEvent,
    output: {} as Route,
  },
  actors: {
    watchMesh: unprovidedCallback<EventObject, Record<string, never>>('watchMesh'),
  },
  delays: {
    /** How long a request waits for a restarting mesh before it gets 503 with Retry-After. */
    maxWait: 60_000,
  },
  guards: {
    decided: ({ context }) => decideRoute(context.facts, context.origin) !== null,
    undecided: ({ context }) => decideRoute(context.facts, context.origin) === null,
  },
  actions: {
    takeFacts: assign((_, params: { facts: RouteFacts }) => ({ facts: params.facts })),
    fixRoute: assign(({ context }) => ({ route: decideRoute(context.facts, context.origin) })),
    giveUp: assign({
      route: { kind: 'refused', status: 503, reason: 'the mesh is restarting; try again shortly', retryAfterS: 5 } as Route,
    }),
  },
}).createMachine({
  id: 'proxy',
  context: ({ input }) => ({ facts: input.facts, origin: input.origin ?? 'client', route: null }),
  initial: 'pending',
  states: {
    // The bound lives here, so updates that still leave the request undecided never extend it.
    pending: {
      invoke: {
        src: 'watchMesh',
        input: {},
        // Without updates the request can only time out: the same refusal as waiting too long.
        onError: { target: 'routed', actions: 'giveUp' },
      },
      after: { maxWait: { target: 'routed', actions: 'giveUp' } },
      initial: 'routing',
      states: {
        routing: {
          always: [
            { guard: 'decided', target: '#proxy.routed', actions: 'fixRoute' },
            { guard: 'undecided', target: 'waiting' },
          ],
        },
        waiting: {
          on: {
            'mesh.updated': { target: 'routing', actions: { type: 'takeFacts', params: ({ event }) => ({ facts: event.facts }) } },
          },
        },
      },
    },
    routed: { type: 'final' },
  },
  output: ({ context }) => context.route!,
});
