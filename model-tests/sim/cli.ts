// The mesh-churn simulator from the command line: replay one seed with its trace, or sweep many seeds and
// print a summary table. See docs/simulator.md.
//   npx tsx model-tests/sim/cli.ts --seed 42                      replay one seed (sizes as churn.test.ts)
//   npx tsx model-tests/sim/cli.ts --nodes 20 --scenarios 5000    sweep seeds 1..5000
import { parseArgs } from 'node:util';
import { replayCommand, runScenario, testSizes, type ScenarioResult } from './scenario.ts';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    nodes: { type: 'string' },
    phases: { type: 'string' },
    scenarios: { type: 'string' },
    from: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  },
});

if (values.help === true) {
  console.log(
    'usage: cli.ts --seed N [--nodes N] [--phases N]      replay one scenario with its trace\n' +
      '       cli.ts [--nodes N] [--phases N] [--scenarios K] [--from S]   sweep seeds S..S+K-1, print a summary',
  );
  process.exit(0);
}

function int(name: string, text: string | undefined, fallback: number, min: number, max: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < min || n > max) {
    console.error(`--${name} must be an integer from ${min} to ${max}, got "${text}"`);
    process.exit(2);
  }
  return n;
}

if (values.seed !== undefined) {
  const seed = int('seed', values.seed, 1, 0, 2 ** 32 - 1);
  const sizes = {
    maxNodes: int('nodes', values.nodes, testSizes(seed).maxNodes, 2, 20),
    phases: int('phases', values.phases, testSizes(seed).phases, 0, 1000),
  };
  const result = runScenario(seed, { ...sizes, trace: true });
  console.log(`seed ${seed}, ${sizes.maxNodes} nodes at most, ${sizes.phases} churn phases\n`);
  console.log(result.trace.join('\n'));
  console.log('');
  printSummary([result], 0);
  process.exit(result.violations.length === 0 ? 0 : 1);
}

const sizes = { maxNodes: int('nodes', values.nodes, 20, 2, 20), phases: int('phases', values.phases, 3, 0, 1000) };
const count = int('scenarios', values.scenarios, 1000, 1, 10_000_000);
const from = int('from', values.from, 1, 0, 2 ** 32 - 1);
const started = performance.now();
const results: ScenarioResult[] = [];
for (let seed = from; seed < from + count; seed++) {
  results.push(runScenario(seed, sizes));
  if (process.stderr.isTTY && (seed - from + 1) % 50 === 0) process.stderr.write(`\r${seed - from + 1}/${count}`);
}
if (process.stderr.isTTY) process.stderr.write('\r');
console.log(`sweep: seeds ${from}..${from + count - 1}, ${sizes.maxNodes} nodes at most, ${sizes.phases} churn phases\n`);
printSummary(results, performance.now() - started, sizes);
process.exit(results.every((r) => r.violations.length === 0) ? 0 : 1);

function printSummary(results: readonly ScenarioResult[], wallMs: number, replaySizes?: { maxNodes: number; phases: number }): void {
  const conv = results.flatMap((r) => r.convergenceMs).sort((a, b) => a - b);
  const failed = results.filter((r) => r.violations.length > 0);
  const sum = (f: (r: ScenarioResult) => number) => results.reduce((s, r) => s + f(r), 0);
  const rows: [string, string][] = [
    ['scenarios', String(results.length)],
    ['churn events', String(sum((r) => r.events))],
    ['messages sent', String(sum((r) => r.messages))],
    ['scheduler steps', String(sum((r) => r.steps))],
    ['simulated time', `${(sum((r) => r.simMs) / 1000).toFixed(0)} s`],
    ['phases converged', String(conv.length)],
    ['convergence p50', `${pct(conv, 0.5)} ms`],
    ['convergence p90', `${pct(conv, 0.9)} ms`],
    ['convergence p99', `${pct(conv, 0.99)} ms`],
    ['convergence max', `${conv[conv.length - 1] ?? 0} ms`],
    ['failures', String(failed.length)],
  ];
  if (wallMs > 0) rows.push(['wall time', `${(wallMs / 1000).toFixed(1)} s`]);
  const width = Math.max(...rows.map(([k]) => k.length));
  console.log(`| ${'metric'.padEnd(width)} | value`);
  console.log(`|${'-'.repeat(width + 2)}|------`);
  for (const [k, v] of rows) console.log(`| ${k.padEnd(width)} | ${v}`);
  for (const r of failed.slice(0, 20)) {
    const v = r.violations[0]!;
    console.log(`\nFAILED seed ${r.seed}: ${v.kind} at ${v.at} ms: ${v.message}`);
    if (replaySizes !== undefined) console.log(`  replay: ${replayCommand(r.seed, replaySizes)}`);
  }
  if (failed.length > 20) console.log(`\n... and ${failed.length - 20} more failed seeds`);
}

function pct(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}
