// The mesh-churn simulator over 1,000 seeded scenarios: the real node machines, an in-memory network and a
// fake process table; every invariant of ARCHITECTURE.md holds at every step. A failure names its seed and
// the command that replays it.
import { describe, expect, it } from 'vitest';
import { replayCommand, runScenario, testSizes } from './sim/scenario.ts';

const SCENARIOS = 1_000;

describe('mesh churn', () => {
  it(`keeps every invariant over ${SCENARIOS} seeded scenarios`, () => {
    const failures: string[] = [];
    let events = 0;
    for (let seed = 1; seed <= SCENARIOS; seed++) {
      const sizes = testSizes(seed);
      const result = runScenario(seed, sizes);
      events += result.events;
      const first = result.violations[0];
      if (first !== undefined) {
        failures.push(`seed ${seed}: ${first.kind} at ${first.at} ms: ${first.message}\n  replay: ${replayCommand(seed, sizes)}`);
      }
    }
    expect(failures, failures.slice(0, 5).join('\n')).toEqual([]);
    // The scenarios really churn: on average several events each beyond the initial joins.
    expect(events).toBeGreaterThan(SCENARIOS * 4);
  }, 600_000);

  it('replays a seed identically', () => {
    const a = runScenario(7, { ...testSizes(7), trace: true });
    const b = runScenario(7, { ...testSizes(7), trace: true });
    expect(b.trace).toEqual(a.trace);
    expect(b.messages).toBe(a.messages);
    expect(a.trace.length).toBeGreaterThan(3);
  });
});
