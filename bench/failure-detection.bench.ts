// How fast a mesh notices a dead peer, with real processes on loopback. Each round of each case starts a fresh
// mesh of 3 nodes from one token (test/harness/mesh-node.ts: the node machine + the real network actor on an
// iroh endpoint, no model), waits for the full mesh, then takes one node down:
//   SIGKILL   the process is gone, no `leaving`, no QUIC close: only the heartbeats can tell;
//   SIGSTOP   the process hangs with its sockets open: only the heartbeats can tell;
//   graceful  `{"cmd":"stop"}` on its stdin: it sends `leaving` to every peer (for comparison).
// Measured per survivor: from the signal (or the stop command) to the `t` of that survivor's first stdout state
// line whose links no longer hold the victim; the round also checks that the two survivors re-converged (each
// linked to the other, and only to it). Prints a markdown table; progress goes to stderr.
//
//   npx tsx bench/failure-detection.bench.ts [--rounds 5] [--false-alarm-s 120] [--only-false-alarm]
//
// False alarms: a settled mesh of 3 watched for --false-alarm-s seconds twice, first quiet, then with one busy-loop
// process per core (at the nodes' own priority), so that every node process competes for the CPU. Nobody dies, so
// every link a node drops meanwhile is a false alarm; reported per window and per node-hour.
//
// The bound is the peer machine's `goneAfter` delay (src/machines/peer.machine.ts), read from the machine.
// Every child is killed at the end, on error and on SIGINT/SIGTERM too (a stopped one gets SIGCONT first).
import { spawn, type ChildProcess } from 'node:child_process';
import { availableParallelism, loadavg } from 'node:os';
import { peerMachine } from '../src/machines/peer.machine.ts';
import { HarnessProc, until } from '../test/harness/proc.ts';
import { describeMachine, machineInfo } from './machine.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};
const ROUNDS = Number(opt('--rounds') ?? 5);
const FALSE_ALARM_S = Number(opt('--false-alarm-s') ?? 120);
const ONLY_FALSE_ALARM = args.includes('--only-false-alarm');
if (!(FALSE_ALARM_S >= 0)) throw new Error(`--false-alarm-s must be >= 0, got ${opt('--false-alarm-s')}`);
if (!Number.isInteger(ROUNDS) || ROUNDS < 1) throw new Error(`--rounds must be a positive integer, got ${opt('--rounds')}`);

const HARNESS = './mesh-node.ts'; // resolved by HarnessProc relative to test/harness/proc.ts
const delays = peerMachine.implementations.delays as Record<string, unknown>;
const GONE_AFTER_MS = typeof delays.goneAfter === 'number' ? delays.goneAfter : 5_000;
const HEARTBEAT_MS = typeof delays.heartbeatInterval === 'number' ? delays.heartbeatInterval : 1_000;
/** Give up on one detection after this long (the bound, with a lot of room for a loaded machine). */
const DETECT_TIMEOUT_MS = GONE_AFTER_MS * 6;

const say = (s = '') => process.stdout.write(`${s}\n`);
const log = (s: string) => process.stderr.write(`[bench] ${s}\n`);
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

interface Ready {
  id: string;
  token: string;
}
interface StateLine {
  ev: 'state';
  t: number;
  links: string[];
}
interface Node {
  p: HarnessProc;
  id: string;
}

// ---- every child, killed whatever happens ----
const all: HarnessProc[] = [];
async function killAll(): Promise<void> {
  await Promise.all(
    all.map(async (p) => {
      if (!p.alive) return;
      const exited = new Promise<void>((r) => p.child.once('exit', () => r()));
      p.kill('SIGCONT');
      p.kill('SIGKILL');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 2_000))]);
    }),
  );
}
/** The busy loops of the false-alarm window. */
const busy: ChildProcess[] = [];
function stopBusy(): void {
  for (const b of busy.splice(0)) if (b.exitCode === null) b.kill('SIGKILL');
}
function killAllSync(): void {
  stopBusy();
  for (const p of all) {
    if (!p.alive) continue;
    try {
      p.kill('SIGCONT');
      p.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
}
process.on('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    log(`${sig}: killing ${all.filter((p) => p.alive).length} children`);
    killAllSync();
    process.exit(130);
  });
}

// ---- mesh helpers (as in test/mesh-membership.test.ts) ----
const stateLines = (p: HarnessProc): StateLine[] => p.lines.filter((l) => l.ev === 'state') as unknown as StateLine[];
const latestLinks = (p: HarnessProc): string[] => [...(stateLines(p).at(-1)?.links ?? [])].sort();

async function converged(group: Node[], ms: number, what: string): Promise<void> {
  await until(
    () => {
      for (const n of group) {
        const want = group.filter((m) => m !== n).map((m) => m.id).sort();
        if (JSON.stringify(latestLinks(n.p)) !== JSON.stringify(want)) return undefined;
      }
      return true;
    },
    ms,
    `${what}: ${group.map((n) => `${n.id.slice(0, 6)}->[${latestLinks(n.p).map((l) => l.slice(0, 6)).join(',')}]`).join(' ')}`,
  );
}

async function startMesh(tag: string): Promise<Node[]> {
  const first = new HarnessProc(HARNESS, { name: `${tag}-n1`, logLevel: 'warn' });
  all.push(first);
  const r1 = await first.waitLine<Ready>((l) => l.ev === 'ready', 60_000, `${tag}-n1 ready`);
  const nodes: Node[] = [{ p: first, id: r1.id }];
  for (let i = 2; i <= 3; i++) {
    const p = new HarnessProc(HARNESS, { name: `${tag}-n${i}`, token: r1.token, logLevel: 'warn' });
    all.push(p);
    nodes.push({ p, id: '' });
  }
  for (const [i, n] of nodes.entries()) {
    if (i > 0) n.id = (await n.p.waitLine<Ready>((l) => l.ev === 'ready', 60_000, `${tag}-n${i + 1} ready`)).id;
  }
  await converged(nodes, 90_000, `${tag}: full mesh of 3`);
  return nodes;
}

async function killMesh(nodes: Node[]): Promise<void> {
  await Promise.all(
    nodes.map(async ({ p }) => {
      if (!p.alive) return;
      const exited = new Promise<void>((r) => p.child.once('exit', () => r()));
      p.kill('SIGCONT');
      p.kill('SIGKILL');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 2_000))]);
    }),
  );
}

// ---- the cases ----
type CaseName = 'SIGKILL' | 'SIGSTOP' | 'graceful stop';
interface Case {
  readonly name: CaseName;
  readonly down: (victim: HarnessProc) => void;
  readonly bound: string;
}
const CASES: readonly Case[] = [
  { name: 'SIGKILL', down: (p) => p.kill('SIGKILL'), bound: `${GONE_AFTER_MS} (goneAfter)` },
  { name: 'SIGSTOP', down: (p) => p.kill('SIGSTOP'), bound: `${GONE_AFTER_MS} (goneAfter)` },
  { name: 'graceful stop', down: (p) => p.send({ cmd: 'stop', reason: 'bench graceful stop' }), bound: 'none (`leaving` frame)' },
];

interface Result {
  /** Per survivor: signal -> its links lose the victim. */
  readonly detect: number[];
  /** Per round: signal -> the last survivor re-converged (the later of the two). */
  readonly mesh: number[];
  failed: number;
}

/** One round: returns [per-survivor ms..., both-converged ms]. */
async function round(c: Case, tag: string): Promise<{ detect: number[]; mesh: number }> {
  const nodes = await startMesh(tag);
  try {
    await new Promise((r) => setTimeout(r, 2 * HEARTBEAT_MS)); // a few heartbeats each way: a settled mesh
    const victim = nodes[2]!;
    const survivors = nodes.slice(0, 2);
    const seen = survivors.map((n) => stateLines(n.p).length); // only lines after the signal count
    const t0 = Date.now();
    c.down(victim.p);
    const detect = await Promise.all(
      survivors.map(async (n, i) => {
        const line = await until(
          () => stateLines(n.p).slice(seen[i]).find((l) => !l.links.includes(victim.id)),
          DETECT_TIMEOUT_MS,
          `${tag}: ${n.id.slice(0, 6)} to drop ${victim.id.slice(0, 6)}`,
        );
        return line.t - t0;
      }),
    );
    // Re-converged: the two survivors hold each other and nothing else (they never lost each other; checked).
    await converged(survivors, 10_000, `${tag}: survivors re-converged`);
    const convergedAt = Math.max(
      ...survivors.map((n, i) => {
        const want = JSON.stringify(survivors.filter((m) => m !== n).map((m) => m.id));
        const line = stateLines(n.p).slice(seen[i]).find((l) => JSON.stringify([...l.links].sort()) === want);
        return line ? line.t - t0 : Date.now() - t0;
      }),
    );
    for (const n of survivors) if (!n.p.alive) throw new Error(`${tag}: survivor ${n.id.slice(0, 6)} exited ${JSON.stringify(n.p.exit)}`);
    return { detect, mesh: convergedAt };
  } finally {
    await killMesh(nodes);
  }
}

interface FalseAlarms {
  readonly window: 'quiet' | 'busy loop per core';
  readonly seconds: number;
  /** Links dropped (a node's state line losing a live peer). */
  readonly drops: number;
  readonly load: readonly number[];
}

/** Watches a settled mesh of 3 for `seconds`: every dropped link is a false alarm (nobody died). */
async function falseAlarmWindow(window: FalseAlarms['window'], seconds: number): Promise<FalseAlarms> {
  const nodes = await startMesh(`fa-${window === 'quiet' ? 'quiet' : 'busy'}`);
  try {
    await new Promise((r) => setTimeout(r, 2 * HEARTBEAT_MS));
    if (window !== 'quiet') {
      for (let i = 0; i < availableParallelism(); i++) busy.push(spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    }
    const seen = nodes.map((n) => stateLines(n.p).length);
    await new Promise((r) => setTimeout(r, seconds * 1_000));
    const load = loadavg();
    stopBusy();
    let drops = 0;
    for (const [i, n] of nodes.entries()) {
      let prev = latestLinksAt(n.p, seen[i]!);
      for (const l of stateLines(n.p).slice(seen[i])) {
        drops += prev.filter((id) => !l.links.includes(id)).length;
        prev = l.links;
      }
    }
    for (const n of nodes) if (!n.p.alive) throw new Error(`false-alarm window: ${n.id.slice(0, 6)} exited ${JSON.stringify(n.p.exit)}`);
    return { window, seconds, drops, load };
  } finally {
    stopBusy();
    await killMesh(nodes);
  }
}

/** The links of the last state line before index `at`. */
function latestLinksAt(p: HarnessProc, at: number): string[] {
  return stateLines(p)[at - 1]?.links ?? [];
}

async function main(): Promise<void> {
  const started = new Date();
  const loadBefore = loadavg();
  const machine = machineInfo();
  log(`${ROUNDS} rounds x ${CASES.length} cases, 3 nodes each; goneAfter ${GONE_AFTER_MS} ms, heartbeat ${HEARTBEAT_MS} ms`);
  const results = new Map<CaseName, Result>(CASES.map((c) => [c.name, { detect: [], mesh: [], failed: 0 }]));
  // Interleave the cases round by round, so a change in the machine's load hits all of them alike.
  for (let r = 1; r <= (ONLY_FALSE_ALARM ? 0 : ROUNDS); r++) {
    for (const c of CASES) {
      const tag = `r${r}-${c.name.replace(/\W+/g, '')}`;
      const res = results.get(c.name)!;
      try {
        const { detect, mesh } = await round(c, tag);
        res.detect.push(...detect);
        res.mesh.push(mesh);
        log(`${tag}: survivors dropped the victim after ${detect.join(', ')} ms; re-converged at ${mesh} ms`);
      } catch (err) {
        res.failed++;
        log(`${tag}: FAILED: ${(err as Error).message}`);
      }
    }
  }
  const alarms: FalseAlarms[] = [];
  if (FALSE_ALARM_S > 0) {
    for (const w of ['quiet', 'busy loop per core'] as const) {
      log(`false alarms: ${w}, ${FALSE_ALARM_S} s`);
      const fa = await falseAlarmWindow(w, FALSE_ALARM_S);
      log(`false alarms: ${w}: ${fa.drops} links dropped; load ${fa.load.map((l) => l.toFixed(2)).join(' ')}`);
      alarms.push(fa);
    }
  }
  const loadAfter = loadavg();

  const fmt = (xs: number[]) => (xs.length ? String(Math.round(median(xs))) : '-');
  const mx = (xs: number[]) => (xs.length ? String(Math.max(...xs)) : '-');
  say(`## Failure detection (${started.toISOString()}, 3 nodes on loopback, ${ROUNDS} rounds per case)`);
  say();
  say(describeMachine(machine));
  say();
  say(`load average (1/5/15 min) before: ${loadBefore.map((l) => l.toFixed(2)).join(' ')}, after: ${loadAfter.map((l) => l.toFixed(2)).join(' ')}`);
  say();
  say('| case | rounds | p50 (ms) | max (ms) | mesh re-converged p50 / max (ms) | bound (ms) |');
  say('|---|---|---|---|---|---|');
  for (const c of CASES) {
    const res = results.get(c.name)!;
    const rounds = res.failed ? `${ROUNDS - res.failed}/${ROUNDS}` : String(ROUNDS);
    say(`| ${c.name} | ${rounds} | ${fmt(res.detect)} | ${mx(res.detect)} | ${fmt(res.mesh)} / ${mx(res.mesh)} | ${c.bound} |`);
  }
  say();
  say(
    `p50 and max over every survivor of every round (2 per round): from the signal to that survivor's first state ` +
      `line without the victim in its links. Re-converged: to the later survivor's first state line linked to the ` +
      `other survivor only. Heartbeat every ${HEARTBEAT_MS} ms; a silent peer is gone ${GONE_AFTER_MS} ms after its last message.`,
  );
  if (alarms.length > 0) {
    say();
    say(`### False alarms: a settled mesh of 3 watched, nobody dies (${availableParallelism()} cores)`);
    say();
    say('| window | seconds | links dropped (false alarms) | per node-hour | load average at the end (1/5/15 min) |');
    say('|---|---|---|---|---|');
    for (const a of alarms) {
      say(`| ${a.window} | ${a.seconds} | ${a.drops} | ${((a.drops / (3 * a.seconds)) * 3600).toFixed(1)} | ${a.load.map((l) => l.toFixed(2)).join(' ')} |`);
    }
    say();
    say(`Busy loop per core: ${availableParallelism()} \`node -e 'for (;;) {}'\` processes at the nodes' own priority for the whole window.`);
  }
  if ([...results.values()].some((r) => r.failed)) process.exitCode = 1;
}

try {
  await main();
} finally {
  await killAll();
  const left = all.filter((p) => p.alive).length;
  if (left) log(`${left} children still alive after cleanup`);
}
