import { runScenario } from './scenario.ts';
const [n, phases, count] = process.argv.slice(2).map(Number);
const t0 = Date.now();
let fails = 0;
let events = 0;
for (let seed = 1; seed <= count!; seed++) {
  const r = runScenario(seed, { maxNodes: n!, phases: phases! });
  events += r.events;
  if (r.violations.length > 0) { fails++; if (fails <= 5) console.log('seed', seed, r.violations.slice(0, 2)); }
}
console.log('fails', fails, 'events', events, 'ms', Date.now() - t0);
