import { runScenario } from './scenario.ts';
const [seed, n, phases] = process.argv.slice(2).map(Number);
const r = runScenario(seed!, { maxNodes: n!, phases: phases!, trace: true });
console.log(r.trace.join('\n'));
console.log(r.violations.slice(0,2));
