// The election machine under a SimulatedClock: bursts settle into one election, and only a plan with a
// new id is sent on.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { assign, createActor, createMachine, enqueueActions, SimulatedClock } from 'xstate';
import { elect } from '../src/machines/election.ts';
import { electionMachine, SETTLE_MS, type ElectionPlannedEvent } from '../src/machines/election.machine.ts';
import { asEndpointId, type Announcement, type Plan } from '../src/machines/mesh-types.ts';
import { factsArb, neutralChange } from './support/election-properties.ts';

const GB = 1e9;
const ann = (id: string, vramGb: number, links: string[], seq = 1): Announcement => ({
  id: asEndpointId(id),
  epoch: 1,
  seq,
  name: id,
  role: 'auto',
  vramBytes: vramGb * GB,
  model: { name: 'glm', bytes: 10 * GB, fingerprint: 'fp' },
  version: 1,
  serving: false,
  addrs: [],
  connectedTo: links.map(asEndpointId),
});

// A stand-in for the node machine: records every election.planned it is sent.
const recorder = createMachine({
  types: {} as { context: { plans: Plan[] }; events: ElectionPlannedEvent },
  context: { plans: [] },
  on: { 'election.planned': { actions: assign({ plans: ({ context, event }) => [...context.plans, event.plan] }) } },
});

function start(self: Announcement, machine = electionMachine) {
  const clock = new SimulatedClock();
  const node = createActor(recorder).start();
  const election = createActor(machine, { clock, input: { self, notify: node } }).start();
  const plans = () => node.getSnapshot().context.plans;
  return { clock, election, plans };
}

describe('electionMachine', () => {
  it('sends the first plan once settled, even when no gossip ever comes', () => {
    const { clock, election, plans } = start(ann('a', 16, []));
    expect(plans()).toEqual([]);
    clock.increment(SETTLE_MS);
    expect(plans()).toHaveLength(1);
    expect(plans()[0]).toMatchObject({ kind: 'ready', host: 'a' });
    expect(election.getSnapshot().value).toBe('settled');
  });

  it('settles a burst of gossip into one election.planned', () => {
    const { clock, election, plans } = start(ann('a', 4, ['b', 'c', 'd']));
    clock.increment(SETTLE_MS);
    expect(plans()[0]?.kind).toBe('waiting');

    election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a'])] });
    clock.increment(10);
    election.send({ type: 'gossip.received', announcements: [ann('c', 4, ['a'])] });
    election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a']), ann('d', 8, ['a'])] });
    clock.increment(SETTLE_MS - 11);
    expect(plans()).toHaveLength(1);
    clock.increment(1);
    expect(plans()).toHaveLength(2);
    const plan = plans()[1] as Plan;
    expect(plan).toEqual(elect(election.getSnapshot().context.view));
    expect(plan).toMatchObject({ kind: 'ready', host: 'd' });
    clock.increment(10 * SETTLE_MS);
    expect(plans()).toHaveLength(2);
  });

  it('a steady stream of gossip cannot postpone the election past one settle window', () => {
    const { clock, election, plans } = start(ann('a', 8, ['b']));
    clock.increment(SETTLE_MS);
    for (let i = 1; i <= 10; i++) {
      election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a'], i)] });
      clock.increment(SETTLE_MS / 5);
      if (i === 5) expect(plans()).toHaveLength(2);
    }
  });

  it('sends nothing for a change that cannot change the plan, but keeps the view current', () => {
    const { clock, election, plans } = start(ann('a', 8, ['b']));
    election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a'])] });
    clock.increment(SETTLE_MS);
    expect(plans()).toHaveLength(1);
    election.send({ type: 'gossip.received', announcements: [{ ...ann('b', 4, ['a'], 2), serving: true }] });
    expect(election.getSnapshot().value).toBe('settling');
    clock.increment(SETTLE_MS);
    expect(plans()).toHaveLength(1);
    expect(election.getSnapshot().context.view.announcements['b']?.serving).toBe(true);
  });

  it('does not even settle for gossip that teaches nothing new', () => {
    const { clock, election } = start(ann('a', 8, ['b']));
    election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a'])] });
    clock.increment(SETTLE_MS);
    election.send({ type: 'gossip.received', announcements: [ann('b', 4, ['a'])] });
    expect(election.getSnapshot().value).toBe('settled');
  });

  it('re-elects on self.changed, and ignores (and notes) an announcement of another node', () => {
    const { clock, election, plans } = start(ann('a', 8, []));
    clock.increment(SETTLE_MS);
    election.send({ type: 'self.changed', announcement: ann('a', 16, [], 2) });
    clock.increment(SETTLE_MS);
    expect(plans()).toHaveLength(2);
    election.send({ type: 'self.changed', announcement: ann('zz', 64, [], 3) });
    clock.increment(SETTLE_MS);
    expect(plans()).toHaveLength(2);
    expect(election.getSnapshot().context.rejected).toMatch(/zz.*not this node/);
  });

  it('takes another settle delay through .provide({ delays })', () => {
    const { clock, plans } = start(ann('a', 16, []), electionMachine.provide({ delays: { settle: 500 } }));
    clock.increment(499);
    expect(plans()).toHaveLength(0);
    clock.increment(1);
    expect(plans()).toHaveLength(1);
  });

  it('runs without anyone to notify, keeping the plan in context', () => {
    const clock = new SimulatedClock();
    const election = createActor(electionMachine, { clock, input: { self: ann('a', 16, []) } }).start();
    clock.increment(SETTLE_MS);
    expect(election.getSnapshot().context).toMatchObject({ plan: { kind: 'ready', host: 'a' }, sentPlanId: expect.any(String) });
  });
});

describe('electionMachine: a change that cannot change the plan restarts nothing', () => {
  // The property at the machine's edge: after a neutral change, the node hears nothing.
  const quietOnNeutralChange = (machine: typeof electionMachine) =>
    fc.property(
      factsArb,
      fc.constantFrom('lite-client-joins', 'seq-bump', 'serving-flips', 'addrs-change' as const),
      fc.nat(),
      (facts, change, who) => {
        const { clock, election, plans } = start(facts.self, machine);
        election.send({ type: 'gossip.received', announcements: facts.announcements });
        clock.increment(SETTLE_MS);
        const before = plans().length;
        const view = election.getSnapshot().context.view;
        election.send({ type: 'gossip.received', announcements: neutralChange(view, change, who) });
        clock.increment(SETTLE_MS);
        if (plans().length !== before) throw new Error(`${change} sent another election.planned`);
      },
    );

  it('holds for the machine', () => {
    fc.assert(quietOnNeutralChange(electionMachine), { numRuns: 300 });
  });

  it('catches the planted bug: announcing the plan after every election', () => {
    const chatty = electionMachine.provide({
      actions: {
        announcePlan: enqueueActions(({ context, enqueue }) => {
          if (context.notify !== undefined) enqueue.sendTo(context.notify, { type: 'election.planned', plan: context.plan });
        }),
      },
    });
    expect(fc.check(quietOnNeutralChange(chatty), { numRuns: 100, endOnFailure: true }).failed).toBe(true);
  });
});
