// (c) convergence: random joins, leaves, crashes, role and VRAM changes and link changes, with gossip
// delivered late, out of order and twice; once everything is delivered, each connected part holds one
// plan, the one its true facts give. Run on the product's merge and election, and on planted bugs.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { electPreferringSelf, electTiesByArrival, lastWriterWinsMerge, product, type ElectionImpl } from '../test/support/election-properties.ts';
import { convergence, runScenario, scenarioArb } from '../test/support/gossip-model.ts';

const mutant = (name: string, patch: Partial<ElectionImpl>): ElectionImpl => ({ ...product, ...patch, name });

describe('(c) the election converges under churn, delay, reordering and duplication', () => {
  it('holds for the product', () => {
    fc.assert(convergence(product), { numRuns: 400 });
  });

  it('its scenarios really churn: parts split, nodes leave and come back, plans differ between parts', () => {
    // Guards the generator itself: a model that never partitions or never crashes would prove little.
    const samples = fc.sample(scenarioArb, { numRuns: 300, seed: 7 }).map((sc) => ({ sc, out: runScenario(product, sc) }));
    expect(samples.filter(({ out }) => out.parts.length > 1).length).toBeGreaterThan(30);
    expect(samples.filter(({ sc }) => sc.steps.some((s) => s.kind === 'crash')).length).toBeGreaterThan(30);
    expect(samples.filter(({ out }) => [...out.plans.values()].some((p) => p.kind === 'ready' && p.stages.length > 1)).length).toBeGreaterThan(20);
    expect(samples.filter(({ out }) => new Set([...out.plans.values()].map((p) => p.id)).size > 1).length).toBeGreaterThan(10);
  });

  // (Exact (epoch, seq) ties never arise here, since each node authors its own announcements with a rising
  // seq: the arrival-order tie-break in the merge is property (a)'s to catch, with replayed announcements.)
  it.each([
    mutant('merge where the last arrival wins', { merge: lastWriterWinsMerge }),
    mutant('election breaking VRAM ties by arrival order', { elect: electTiesByArrival }),
    mutant('election preferring the node itself on ties', { elect: electPreferringSelf }),
  ])('catches the planted bug: $name', (impl) => {
    const result = fc.check(convergence(impl), { numRuns: 400, endOnFailure: true });
    expect(result.failed, 'no counterexample in 400 runs').toBe(true);
  });
});
