// The simulator bites: each test plants one known bug through `.provide()` (or in the simulated world around
// the machines, never in their code) and shows that a bounded number of seeded scenarios finds it.
import { assign } from 'xstate';
import { describe, expect, it } from 'vitest';
import { elect } from '../src/machines/election.ts';
import type { View } from '../src/machines/mesh-types.ts';
import { roleIn } from '../src/machines/node-plan.ts';
import { electionMachine } from '../src/machines/election.machine.ts';
import { runScenario } from './sim/scenario.ts';
import type { ViolationKind, WorldOptions } from './sim/world.ts';

const BOUND = 60;

/** The first seed (1..BOUND) whose scenario reports `kind`, or null. */
function firstSeedFinding(kind: ViolationKind, world: WorldOptions): number | null {
  for (let seed = 1; seed <= BOUND; seed++) {
    const result = runScenario(seed, { maxNodes: 5, phases: 3, world });
    if (result.violations.some((v) => v.kind === kind)) return seed;
  }
  return null;
}

describe('planted bugs', () => {
  it('finds two hosts in one quiet connected part (each node elects over its own facts only)', () => {
    const selfish = electionMachine.provide({
      actions: {
        elect: assign(({ context }) => {
          const own = context.view.announcements[context.view.self]!;
          const alone: View = { self: context.view.self, announcements: { [own.id]: own } };
          return { plan: elect(alone) };
        }),
      },
    });
    const seed = firstSeedFinding('two-hosts-in-one-part', {
      mutateNode: (m) => m.provide({ actors: { election: selfish } }),
    });
    expect(seed, 'no scenario found two hosts').not.toBeNull();
  }, 300_000);

  it("finds a worker's rpc-server serving two hosts (no kill on plan change, tunnels ignore the policy)", () => {
    const seed = firstSeedFinding('worker-serves-two-hosts', {
      mutateNode: (m) =>
        m.provide({
          // "Keep the processes, only adopt the new plan": the fresh start is skipped.
          actions: { stopProcesses: assign({}) },
          guards: { processesDown: () => true },
        }),
      worldMutants: { tunnelIgnoresPolicy: true },
    });
    expect(seed, 'no scenario found a worker serving two hosts').not.toBeNull();
  }, 300_000);

  it('finds a restart without a plan change (the host restarts llama-server on every mesh change)', () => {
    const seed = firstSeedFinding('restart-without-plan-change', {
      mutateNode: (m) =>
        m.provide({
          guards: {
            planDiffersFromRunning: ({ context }) =>
              context.running !== null &&
              context.plan !== null &&
              (context.plan.id !== context.running.id ||
                (roleIn(context.running, context.self.id) === 'host' && context.llama === 'ready')),
          },
        }),
    });
    expect(seed, 'no scenario found a restart without a plan change').not.toBeNull();
  }, 300_000);

  it('the same seeds pass without the planted bugs', () => {
    for (let seed = 1; seed <= 10; seed++) {
      expect(runScenario(seed, { maxNodes: 5, phases: 3 }).violations).toEqual([]);
    }
  }, 300_000);
});
