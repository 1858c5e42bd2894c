// Faults under a steady load (issue 12, item 5): real `mesh-inference` processes (test/e2e-support.ts), 4 model
// nodes and a lite client (bench/faults/mesh.ts: a hosts with b; d, e spare; c the lite client). Per fault, a
// fresh mesh: first the undisturbed reference text per prompt (non-streamed, through c; a streamed one must give
// the same), then a steady mix of greedy chat completions (temperature 0, ignore_eos, max_tokens 48; streamed and
// not, alternating) through 2 loops per entry node: the lite client c and the worker b (b is left out as an entry
// when it is the victim). 5 s into the load the fault comes; a probe loop through c times "serving again"; the load
// goes on until at least 30 s after the fault (and 20 s after an undo: SIGCONT, link restored) and 10 s after the
// probe, then stops starting requests and waits for those in flight.
//
// Each request ends as (bench/faults/load.ts):
//   same        finish_reason and exactly the reference text of its prompt (completed, same text)
//   different   finish_reason, another text that repeats nothing (completed, not the same); the table says how
//               many equal what the mesh answers undisturbed after the fault (asked once the load has stopped)
//   duplicated  finish_reason, but more than one id or finish_reason, or text of which the reference is a proper
//               prefix, or that, after the longest prefix it shares with it, goes on with 8+ characters the
//               reference had already given before that point (a stretch sent twice)
//   clean-error an HTTP error status or an SSE error event (the openai client throws an APIError)
//   broken      the connection failed without either (the client saw it fail, but not cleanly)
//   lost        a stream that ended without finish_reason and without an error, or no end within 180 s
// Time to serve again: from the fault until a fresh non-streamed request (4 tokens) through c completes; it
// waits in the mesh (bounded) and queues behind the load at the host.
//
//   npx tsx bench/faults.bench.ts [--only 1,3] [--no-lab]      (FAULTS_DUMP=file.jsonl: every request not 'same', with its reference)
//
// The link cut needs the WAN lab (root, iproute2): without it that row says why and is skipped.
import { appendFileSync } from 'node:fs';
import { describeMachine } from './machine.ts';
import { makeE2eModel } from '../test/e2e-support.ts';
import { checkWanLabPossible } from '../test/support/wan-lab.ts';
import { FAULTS, startFaultMesh, type Fault } from './faults/mesh.ts';
import { commonPrefix, HANG_BOUND_MS, Load, MAX_TOKENS, one, PROMPTS, sleep, timeToServe, type Outcome, type RequestResult } from './faults/load.ts';

const args = process.argv.slice(2);
const opt = (f: string): string | undefined => {
  const i = args.indexOf(f);
  return i >= 0 ? args[i + 1] : undefined;
};
const ONLY = opt('--only')?.split(',').map(Number) ?? null;
const NO_LAB = args.includes('--no-lab');
const say = (s = '') => process.stdout.write(`${s}\n`);
const log = (s: string) => process.stderr.write(`[faults ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

interface Row {
  readonly fault: string;
  readonly entries: string;
  readonly skipped?: string;
  readonly results?: readonly RequestResult[];
  readonly spanning?: readonly RequestResult[];
  readonly serveAgainMs?: number | null;
  readonly continuations?: number;
  /** 'different' results whose text is what the mesh answers after the fault, undisturbed. */
  readonly asAfter?: number;
  readonly refNote?: string;
  readonly notes?: readonly string[];
}

async function runFault(fault: Fault, model: Awaited<ReturnType<typeof makeE2eModel>>, firstRefs: string[] | null): Promise<{ row: Row; refs: string[] | null }> {
  const entriesNote = fault.victimIsEntryWorker ? 'c (b is the victim)' : 'c, b';
  if (fault.inLab) {
    if (NO_LAB) return { row: { fault: fault.name, entries: entriesNote, skipped: '--no-lab' }, refs: null };
    try {
      await checkWanLabPossible();
    } catch (err) {
      return { row: { fault: fault.name, entries: entriesNote, skipped: (err as Error).message }, refs: null };
    }
  }
  log(`${fault.name}: starting the mesh${fault.inLab ? ' in the WAN lab' : ''}`);
  const m = await startFaultMesh(model, fault.inLab);
  try {
    const refs: string[] = [];
    const refNotes: string[] = [];
    for (let p = 0; p < PROMPTS.length; p++) {
      const r = await one(m.c, p, false, []);
      if (r.outcome !== 'same') throw new Error(`the reference request for prompt ${p} failed: ${r.outcome} ${r.detail}`);
      refs.push(r.text);
      const s = await one(m.c, p, true, refs);
      if (s.outcome !== 'same') refNotes.push(`prompt ${p}: streamed ${s.outcome} (${s.detail})`);
      if (firstRefs && firstRefs[p] !== r.text) refNotes.push(`prompt ${p}: reference differs from the first mesh's`);
    }
    log(`references: ${refs.map((t) => t.length).join(', ')} chars${refNotes.length ? `; ${refNotes.join('; ')}` : ''}`);
    const entries = fault.victimIsEntryWorker ? [m.c] : [m.c, m.b];
    const contBefore = [m.c, m.b].map((n) => continuations(n.lines()));
    const load = new Load(refs);
    load.start(entries);
    await sleep(5_000);
    log(`in flight at the fault: ${load.inFlight.size}; done before: ${load.results.length}`);
    const t0 = Date.now();
    const undo = fault.inject(m);
    const probe = timeToServe(m.c, t0).then((ms) => (log(`serving again after ${ms} ms`), ms));
    let undone: Promise<unknown> = Promise.resolve();
    if (undo) undone = sleep(undo.undoAfterMs).then(() => (undo.undo(), log(undo.what)));
    await undone;
    const serveAgainMs = await probe;
    const minEnd = t0 + Math.max(30_000, (undo?.undoAfterMs ?? 0) + 20_000);
    await sleep(Math.max(10_000, minEnd - Date.now()));
    log('stopping the load, waiting for the requests in flight');
    await load.stop();
    // What the mesh answers after the fault, undisturbed: a text that is not the reference may be this one.
    const after: string[] = [];
    for (let p = 0; p < PROMPTS.length; p++) after.push((await one(m.c, p, false, [])).text);
    const results = load.results;
    const asAfter = results.filter((r) => r.outcome === 'different' && r.text === after[r.prompt]).length;
    const afterNote = after.map((t, p) => (t === refs[p] ? null : `prompt ${p} now answers differently from char ${commonPrefix(t, refs[p]!)}`)).filter((x) => x !== null);
    const spanning = results.filter((r) => r.startedAt < t0 && r.endedAt > t0);
    const cont = [m.c, m.b].map((n, i) => continuations(n.lines()) - contBefore[i]!).reduce((x, y) => x + y, 0);
    if (process.env['FAULTS_DUMP']) {
      const odd = results.filter((r) => r.outcome !== 'same').map((r) => ({ ...r, ref: refs[r.prompt], fault: fault.name }));
      appendFileSync(process.env['FAULTS_DUMP'], `${JSON.stringify({ fault: fault.name, t0, odd })}\n`);
    }
    const notes = [...new Set(results.filter((r) => r.outcome !== 'same').map((r) => `${r.entry} ${r.stream ? 'stream' : 'plain'} ${r.outcome}: ${r.detail}`))].slice(0, 8);
    return { row: { fault: fault.name, entries: entriesNote, results, spanning, serveAgainMs, continuations: cont, asAfter, refNote: [...refNotes, ...afterNote].join('; '), notes }, refs };
  } finally {
    log('stopping the mesh');
    await m.close();
  }
}

const continuations = (lines: readonly string[]) => lines.filter((l) => /continuing the request on the mesh as it is now/.test(l)).length;
const count = (rs: readonly RequestResult[], o: Outcome) => rs.filter((r) => r.outcome === o).length;

function table(rows: readonly Row[]): void {
  say('| fault | entry nodes | requests | completed | same text | different text (= after-fault answer) | clean errors | broken | lost | duplicated | spanning the fault: same / all | continuations | time to serve again |');
  say('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    if (r.skipped !== undefined || !r.results) {
      say(`| ${r.fault} | ${r.entries} | skipped: ${r.skipped} | | | | | | | | | | |`);
      continue;
    }
    const rs = r.results;
    const completed = count(rs, 'same') + count(rs, 'different') + count(rs, 'duplicated');
    const tts = r.serveAgainMs === null || r.serveAgainMs === undefined ? `none within ${HANG_BOUND_MS / 1000} s` : `${(r.serveAgainMs / 1000).toFixed(1)} s`;
    say(
      `| ${r.fault} | ${r.entries} | ${rs.length} | ${completed} | ${count(rs, 'same')} | ${count(rs, 'different')} (${r.asAfter}) | ${count(rs, 'clean-error')} | ${count(rs, 'broken')} | ${count(rs, 'lost')} | ${count(rs, 'duplicated')} | ${count(r.spanning!, 'same')} / ${r.spanning!.length} | ${r.continuations} | ${tts} |`,
    );
  }
}

function perEntry(rows: readonly Row[]): void {
  say('| fault | entry | streamed | requests | same text | different | clean errors | broken | lost | duplicated |');
  say('|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    if (!r.results) continue;
    for (const entry of ['c', 'b']) {
      for (const stream of [true, false]) {
        const rs = r.results.filter((x) => x.entry === entry && x.stream === stream);
        if (rs.length === 0) continue;
        say(`| ${r.fault} | ${entry} | ${stream ? 'yes' : 'no'} | ${rs.length} | ${count(rs, 'same')} | ${count(rs, 'different')} | ${count(rs, 'clean-error')} | ${count(rs, 'broken')} | ${count(rs, 'lost')} | ${count(rs, 'duplicated')} |`);
      }
    }
  }
}

async function main(): Promise<void> {
  say(describeMachine());
  say(`Run ${new Date().toISOString()}; greedy chat completions, max_tokens ${MAX_TOKENS}, ${PROMPTS.length} prompts, 2 loops per entry node.`);
  const model = await makeE2eModel();
  const rows: Row[] = [];
  let firstRefs: string[] | null = null;
  try {
    for (const [i, fault] of FAULTS.entries()) {
      if (ONLY && !ONLY.includes(i + 1)) continue;
      try {
        const { row, refs } = await runFault(fault, model, firstRefs);
        firstRefs ??= refs;
        rows.push(row);
      } catch (err) {
        log(`${fault.name}: ${(err as Error).stack ?? err}`);
        rows.push({ fault: fault.name, entries: '-', skipped: `failed to run: ${(err as Error).message.split('\n')[0]}` });
      }
    }
  } finally {
    await model.remove();
  }
  say();
  table(rows);
  say();
  perEntry(rows);
  say();
  for (const r of rows) {
    if (r.refNote) say(`- ${r.fault}: reference: ${r.refNote}`);
    for (const n of r.notes ?? []) say(`- ${r.fault}: ${n}`);
  }
  say(describeMachine().replace('Machine:', 'Machine at the end:'));
}

await main();
process.exit(0);
