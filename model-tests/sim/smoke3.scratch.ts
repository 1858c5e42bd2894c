import { runScenario } from './scenario.ts';
let msgs = 0, steps = 0, sim = 0;
const t0 = Date.now();
for (let seed = 1; seed <= 50; seed++) { const r = runScenario(seed, { maxNodes: 5, phases: 2 }); msgs += r.messages; steps += r.steps; sim += r.simMs; }
console.log({ msgs, steps, sim, ms: Date.now() - t0 });
