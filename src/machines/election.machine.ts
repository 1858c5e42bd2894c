// The election as an actor: owns this node's gossip view, settles bursts of gossip, elects, and tells
// its owner about each new plan. Pure (time only through the XState delay `settle`).
//
// Contract (the node machine relies on it):
//   input:   { self: Announcement; notify?: AnyActorRef }
//   accepts: { type: 'gossip.received'; announcements: readonly Announcement[] }  merged by (epoch, seq)
//            { type: 'self.changed'; announcement: Announcement }  replaces this node's own announcement
//              (raise its seq so peers accept it); an announcement of another id is ignored and noted
//              in context.rejected
//            { type: 'view.pruned'; ids }  the node dropped these ids (expired or evicted); already verified
//              facts only ever reach this machine: the node checks signatures before it forwards gossip
//   sends:   { type: 'election.planned'; plan: Plan } to `notify`, `settle` ms after the first change
//            of a burst (later events of the burst join it; a steady stream of gossip cannot postpone
//            the election), and ONLY when the plan id differs from the last one sent: equal ids mean
//            nothing to restart, so the node never hears of changes that cannot change the plan.
//            The first plan after start is always sent (also for a solo node that hears no gossip).
//            Gossip that teaches the view nothing new does not even start a settle window.
//   context: view, plan (the latest elected), sentPlanId, rejected: readable from snapshots and the inspector.
import { assign, enqueueActions, setup, type AnyActorRef } from 'xstate';
import { elect } from './election.ts';
import { emptyView, mergeAnnouncements, setSelf, withoutIds } from './gossip.ts';
import type { Announcement, EndpointId, Plan, View } from './mesh-types.ts';

export interface ElectionInput {
  readonly self: Announcement;
  readonly notify?: AnyActorRef;
}

export type ElectionEvent =
  | { readonly type: 'gossip.received'; readonly announcements: readonly Announcement[] }
  | { readonly type: 'self.changed'; readonly announcement: Announcement }
  // The node dropped these ids from its view (expired or evicted: src/machines/gossip.ts).
  | { readonly type: 'view.pruned'; readonly ids: readonly EndpointId[] };

/** What the election machine sends to `notify`. */
export interface ElectionPlannedEvent {
  readonly type: 'election.planned';
  readonly plan: Plan;
}

export interface ElectionContext {
  readonly view: View;
  /** The plan of the latest election (not yet elected changes are still settling). */
  readonly plan: Plan;
  /** Id of the last plan sent to `notify`; null before the first. */
  readonly sentPlanId: string | null;
  /** Why the last ignored event was ignored, for people reading the inspector. */
  readonly rejected: string | null;
  readonly notify: AnyActorRef | undefined;
}

/** Default settle window in ms; tests and the composition root may override it via `.provide({ delays })`. */
export const SETTLE_MS = 50;

export const electionMachine = setup({
  types: {
    context: {} as ElectionContext,
    events: {} as ElectionEvent,
    input: {} as ElectionInput,
  },
  delays: {
    settle: SETTLE_MS,
  },
  guards: {
    isOwnAnnouncement: ({ context }, params: { announcement: Announcement }) =>
      params.announcement.id === context.view.self,
    teachesSomething: ({ context }, params: { announcements: readonly Announcement[] }) =>
      mergeAnnouncements(context.view, params.announcements).changed,
  },
  actions: {
    mergeGossip: assign(({ context }, params: { announcements: readonly Announcement[] }) => ({
      view: mergeAnnouncements(context.view, params.announcements).view,
    })),
    pruneView: assign(({ context }, params: { ids: readonly EndpointId[] }) => ({ view: withoutIds(context.view, params.ids) })),
    replaceSelf: assign(({ context }, params: { announcement: Announcement }) => ({
      view: setSelf(context.view, params.announcement),
    })),
    noteForeignSelf: assign(({ context }, params: { announcement: Announcement }) => ({
      rejected: `self.changed carried ${params.announcement.id}, not this node (${context.view.self})`,
    })),
    elect: assign(({ context }) => ({ plan: elect(context.view) })),
    announcePlan: enqueueActions(({ context, enqueue }) => {
      if (context.plan.id === context.sentPlanId) return;
      if (context.notify !== undefined) {
        const event: ElectionPlannedEvent = { type: 'election.planned', plan: context.plan };
        enqueue.sendTo(context.notify, event);
      }
      enqueue.assign({ sentPlanId: context.plan.id });
    }),
  },
}).createMachine({
  id: 'election',
  context: ({ input }) => {
    const view = emptyView(input.self);
    return { view, plan: elect(view), sentPlanId: null, rejected: null, notify: input.notify };
  },
  // Start settling, so the first plan goes out even if no gossip ever arrives (a solo node).
  initial: 'settling',
  states: {
    settling: {
      after: {
        settle: { target: 'settled', actions: ['elect', 'announcePlan'] },
      },
      on: {
        'gossip.received': {
          actions: { type: 'mergeGossip', params: ({ event }) => ({ announcements: event.announcements }) },
        },
        'view.pruned': { actions: { type: 'pruneView', params: ({ event }) => ({ ids: event.ids }) } },
        'self.changed': [
          {
            guard: { type: 'isOwnAnnouncement', params: ({ event }) => ({ announcement: event.announcement }) },
            actions: { type: 'replaceSelf', params: ({ event }) => ({ announcement: event.announcement }) },
          },
          { actions: { type: 'noteForeignSelf', params: ({ event }) => ({ announcement: event.announcement }) } },
        ],
      },
    },
    settled: {
      on: {
        // Gossip that teaches nothing new (the periodic re-send of a quiet mesh) does not re-elect.
        'gossip.received': {
          guard: { type: 'teachesSomething', params: ({ event }) => ({ announcements: event.announcements }) },
          target: 'settling',
          actions: { type: 'mergeGossip', params: ({ event }) => ({ announcements: event.announcements }) },
        },
        'view.pruned': { target: 'settling', actions: { type: 'pruneView', params: ({ event }) => ({ ids: event.ids }) } },
        'self.changed': [
          {
            guard: { type: 'isOwnAnnouncement', params: ({ event }) => ({ announcement: event.announcement }) },
            target: 'settling',
            actions: { type: 'replaceSelf', params: ({ event }) => ({ announcement: event.announcement }) },
          },
          { actions: { type: 'noteForeignSelf', params: ({ event }) => ({ announcement: event.announcement }) } },
        ],
      },
    },
  },
});
