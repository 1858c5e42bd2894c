// Child processes: output lines and tails, exit codes and signals, stop with a grace period, the whole
// process tree, SIGPIPE ignored, and no orphans when the node process exits, throws or is SIGKILLed.
import { chmodSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { liveProcesses, spawnManaged, SpawnError, stopAll } from '../src/io/llama/processes.ts';

const SH = '/bin/sh';
const bashPath = (await execa('sh', ['-c', 'command -v bash'])).stdout.trim();

afterEach(async () => {
  await stopAll(1000);
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie (exited, waiting for a parent that is gone) still answers kill -0; it runs nothing.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z/.test(stat);
  } catch {
    return process.platform !== 'linux';
  }
}

async function waitFor(cond: () => boolean, ceilingMs: number): Promise<boolean> {
  const end = Date.now() + ceilingMs;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

describe('spawnManaged', () => {
  it('reports output lines, the exit code and the tail', async () => {
    const p = spawnManaged({ name: 't', file: SH, args: ['-c', 'echo one; echo two >&2; printf three; exit 3'] });
    const seen: string[] = [];
    p.onLine((line, stream) => seen.push(`${stream}:${line}`));
    const info = await p.exited;
    expect(info).toMatchObject({ code: 3, signal: null, requested: false });
    expect(info.tail).toEqual(expect.arrayContaining(['one', 'two', 'three']));
    expect(seen).toEqual(expect.arrayContaining(['stdout:one', 'stderr:two', 'stdout:three']));
    expect(p.exitInfo()).toEqual(info);
    expect(liveProcesses()).not.toContain(p);
  });

  it('the pid is the program itself (exec), so a signal from outside is reported as that signal', async () => {
    const p = spawnManaged({ name: 't', file: SH, args: ['-c', 'echo ready; exec sleep 100'] });
    await new Promise<void>((r) => p.onLine(() => r()));
    process.kill(p.pid, 'SIGKILL');
    const info = await p.exited;
    expect(info).toMatchObject({ code: null, signal: 'SIGKILL', requested: false });
  });

  it('keeps only the last lines', async () => {
    const p = spawnManaged({ name: 't', file: SH, args: ['-c', 'i=0; while [ $i -lt 50 ]; do echo line$i; i=$((i+1)); done'], tailLines: 5 });
    const info = await p.exited;
    expect(info.tail).toEqual(['line45', 'line46', 'line47', 'line48', 'line49']);
  });

  it('stop() sends SIGTERM, then SIGKILL to a child that ignores it', async () => {
    const polite = spawnManaged({ name: 'polite', file: SH, args: ['-c', 'exec sleep 100'] });
    expect((await polite.stop(5000)).signal).toBe('SIGTERM');
    const stubborn = spawnManaged({ name: 'stubborn', file: SH, args: ['-c', "trap '' TERM; echo ready; while :; do sleep 0.05; done"] });
    await new Promise<void>((r) => stubborn.onLine(() => r()));
    const info = await stubborn.stop(300);
    expect(info).toMatchObject({ signal: 'SIGKILL', requested: true });
    expect(await stubborn.stop()).toEqual(info);
  });

  it('stop() takes down the whole process tree', async () => {
    const p = spawnManaged({ name: 'tree', file: SH, args: ['-c', 'sleep 100 & echo $!; sleep 100 & echo $!; wait'] });
    const pids: number[] = [];
    await new Promise<void>((r) => p.onLine((l) => { pids.push(Number(l)); if (pids.length === 2) r(); }));
    expect(pids.every(alive)).toBe(true);
    await p.stop(2000);
    expect(await waitFor(() => !pids.some(alive), 5000)).toBe(true);
  });

  it('ignores SIGPIPE by default, and can leave it alone', async () => {
    // `yes` writing into a closed pipe: killed by SIGPIPE (141) by default, EPIPE (status 1) when ignored.
    const script = 'yes | true; echo "yes=${PIPESTATUS[0]}"';
    const ignored = spawnManaged({ name: 'p', file: bashPath, args: ['-c', script] });
    expect((await ignored.exited).tail).toContain('yes=1');
    const dflt = spawnManaged({ name: 'p', file: bashPath, args: ['-c', script], ignoreSigpipe: false });
    expect((await dflt.exited).tail).toContain('yes=141');
  });

  it('the program has its own stdin: written to, and closed without waking the watchdog', async () => {
    const p = spawnManaged({ name: 'stdin', file: SH, args: ['-c', 'read x; echo "got:$x"; cat >/dev/null; echo eof; sleep 0.3; echo still-running'] });
    const lines: string[] = [];
    p.onLine((l) => lines.push(l));
    p.writeStdin('hello\n');
    await new Promise<void>((r) => p.onLine((l) => l === 'got:hello' && r()));
    p.closeStdin();
    const info = await p.exited;
    // Exit 0 after printing everything: the EOF reached the program, and no SIGTERM came from the watchdog.
    expect(info).toMatchObject({ code: 0, signal: null });
    expect(lines).toEqual(['got:hello', 'eof', 'still-running']);
  });

  it('passes environment variables and the working directory', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'proc-'));
    const p = spawnManaged({ name: 'env', file: SH, args: ['-c', 'echo "$FOO $(pwd)"'], env: { FOO: 'bar' }, cwd: dir });
    expect((await p.exited).tail[0]).toMatch(new RegExp(`^bar .*${dir.split('/').pop()}$`));
  });

  it('refuses a missing or non-executable file with a clear error', () => {
    expect(() => spawnManaged({ name: 'x', file: '/nonexistent/llama-server', args: [] })).toThrow(SpawnError);
    expect(() => spawnManaged({ name: 'x', file: '/nonexistent/llama-server', args: [] })).toThrow('/nonexistent/llama-server does not exist');
    const dir = mkdtempSync(join(tmpdir(), 'proc-'));
    const f = join(dir, 'not-exec');
    writeFileSync(f, '#!/bin/sh\n');
    chmodSync(f, 0o644);
    expect(() => spawnManaged({ name: 'x', file: f, args: [] })).toThrow(/is not executable/);
    expect(() => spawnManaged({ name: 'x', file: dir, args: [] })).toThrow(/is not a file/);
  });

  it('stopAll() stops the newest first, each after the one before has exited; beforeStop asks politely first', async () => {
    const order: string[] = [];
    const polite: string[] = [];
    // The newer one takes its time to exit: stopped together, the older would be gone first.
    const loop = (onTerm: string) => `trap '${onTerm} exit 0' TERM; echo up; while :; do sleep 0.05; done`;
    const older = spawnManaged({ name: 'older', file: SH, args: ['-c', loop('')] });
    const newer = spawnManaged({ name: 'newer', file: SH, args: ['-c', loop('sleep 0.5;')], beforeStop: (p) => polite.push(p.name) });
    for (const p of [older, newer]) {
      await new Promise<void>((r) => (p.tail().includes('up') ? r() : p.onLine(() => r())));
      void p.exited.then(() => order.push(p.name));
    }
    await stopAll(3000);
    expect(order).toEqual(['newer', 'older']);
    expect(polite).toEqual(['newer']);
  });

  it('stopAll() stops every live child', async () => {
    const a = spawnManaged({ name: 'a', file: SH, args: ['-c', 'exec sleep 100'] });
    const b = spawnManaged({ name: 'b', file: SH, args: ['-c', 'exec sleep 100'] });
    expect(liveProcesses()).toEqual(expect.arrayContaining([a, b]));
    await stopAll(2000);
    expect(a.exitInfo()?.requested).toBe(true);
    expect(b.exitInfo()?.requested).toBe(true);
    expect(liveProcesses()).toHaveLength(0);
  });
});

describe('no orphans', () => {
  // A separate node process owns a child (and a grandchild); we end that node in each way a node can end
  // and check that its children are gone. Ceilings are generous: they catch leaks, not speed.
  // The node ends itself (exit, throw) only when the test says so on its stdin, after the test has seen
  // the child alive: ending at once raced that check (on a loaded machine the child was already gone).
  const processesTs = new URL('../src/io/llama/processes.ts', import.meta.url).pathname;
  const owner = (ending: string) => `
import { spawnManaged } from ${JSON.stringify(processesTs)};
const p = spawnManaged({ name: 'kid', file: '/bin/sh', args: ['-c', 'sleep 1000 & echo $!; exec sleep 1000'], orphanGraceMs: 1000 });
p.onLine((l) => { console.log(JSON.stringify({ child: p.pid, grandchild: Number(l) })); process.stdin.once('data', () => { ${ending} }); });
setInterval(() => {}, 1000);`;

  async function endOwner(ending: string, kill?: NodeJS.Signals): Promise<{ child: number; grandchild: number; exit: { exitCode?: number; signal?: string } }> {
    const node = execa('node', ['--import', 'tsx', '--input-type=module', '-e', owner(ending)], { reject: false, buffer: false });
    const pids = await new Promise<{ child: number; grandchild: number }>((resolve, reject) => {
      node.stdout.once('data', (d: Buffer) => resolve(JSON.parse(d.toString())));
      node.once('exit', () => reject(new Error('owner exited before printing')));
    });
    expect(alive(pids.child)).toBe(true);
    if (kill !== undefined) node.kill(kill);
    else node.stdin.write('end\n');
    const r = await node;
    return { ...pids, exit: { exitCode: r.exitCode, signal: r.signal } };
  }

  it.each([
    ['SIGKILLed', '', 'SIGKILL'],
    ['ended by an unhandled SIGTERM', '', 'SIGTERM'],
    ['ended by an unhandled SIGINT', '', 'SIGINT'],
  ] as const)('children die when the node is %s', async (_, ending, signal) => {
    const r = await endOwner(ending, signal);
    expect(r.exit.signal).toBe(signal);
    expect(await waitFor(() => !alive(r.child) && !alive(r.grandchild), 10_000)).toBe(true);
  });

  it.each([
    ['calls process.exit()', 'process.exit(0);'],
    ['crashes with an uncaught exception', "setTimeout(() => { throw new Error('boom'); });"],
  ])('children die when the node %s', async (_, ending) => {
    const r = await endOwner(ending);
    expect(await waitFor(() => !alive(r.child) && !alive(r.grandchild), 10_000)).toBe(true);
  });
});
