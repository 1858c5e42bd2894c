// Child processes of a node (llama-server, ggml-rpc-server): spawned with execa, their output kept as a
// log tail, their exit reported, and never left behind: they die with the node, however the node dies.
//
// How "no orphans" holds (there is no prctl(PR_SET_PDEATHSIG) from Node, and nothing like it on macOS):
//  1. A pipe watchdog. Every child starts as `bash -c <WATCHDOG> name file args...`. The script forks a
//     tiny subshell that blocks reading its stdin, a pipe whose only writer is this Node process, then
//     `exec`s the real program in place of bash (same pid, so exit codes and signals are the program's).
//     The program gets its own stdin, a second pipe (our fd 3; closeStdin / writeStdin), not shared with
//     the watchdog.
//     When the node dies in any way (SIGKILL and OOM included) the kernel closes the pipe; the subshell
//     reads EOF and sends SIGTERM, then SIGKILL after a grace period, to the child's process group.
//  2. A registry. Every live child is known; `process.on('exit')` SIGKILLs their groups synchronously
//     (process.exit, an uncaught exception), and `stopAll()` gives a graceful shutdown to the composition
//     root's SIGINT/SIGTERM handlers.
// Each child leads its own process group (detached: setsid), so a stop reaches everything it started,
// and a terminal's Ctrl-C reaches only the node, which then stops its children in order.
// The same bash line can ignore SIGPIPE (`trap '' PIPE` survives exec): ggml-rpc-server otherwise dies of
// SIGPIPE (exit 141) when a queued client disconnects, and Node restores SIGPIPE to default in children.
import { accessSync, constants as fsConstants, statSync } from 'node:fs';
import { execa } from 'execa';
import type { Logger } from '../host/logger.ts';

/** Lines of output kept per child, for crash reports. */
export const DEFAULT_TAIL_LINES = 200;
/** How long a child gets between SIGTERM and SIGKILL. */
export const DEFAULT_STOP_GRACE_MS = 5_000;

/*
 * $1.. = the program and its arguments. The watchdog keeps only its stdin (holding the output pipes, or
 * the program's stdin on fd 3, would keep our readers from ever seeing EOF). It ignores TERM/INT so that a stop of the whole group
 * does not kill it before it has done its job; it exits by itself once the target is gone (its pipe is
 * closed by the registry when the child exits; if the node is alive it reads EOF then).
 * `kill -0` guards against signalling a pid that already exited; pids are allocated sequentially, so the
 * few microseconds between the exit and the check leave no practical room for reuse.
 */
const WATCHDOG = `
[ "$MESH_IGNORE_SIGPIPE" = 1 ] && trap '' PIPE
unset MESH_IGNORE_SIGPIPE
target=$$
# A background job of a non-interactive shell gets /dev/null as stdin unless redirected explicitly.
exec 4<&0
(
  trap '' TERM INT
  while read -r _; do :; done
  kill -0 "$target" 2>/dev/null || exit 0
  kill -TERM -- "-$target" 2>/dev/null || kill -TERM "$target" 2>/dev/null
  i=0
  while [ "$i" -lt "$MESH_WATCHDOG_GRACE_TENTHS" ]; do
    kill -0 "$target" 2>/dev/null || exit 0
    sleep 0.1
    i=$((i + 1))
  done
  kill -KILL -- "-$target" 2>/dev/null || kill -KILL "$target" 2>/dev/null
) <&4 4<&- 3<&- 5<&- >/dev/null 2>&1 &
exec 4<&- </dev/null
unset MESH_WATCHDOG_GRACE_TENTHS
exec "$@" <&3 3<&-
`;

export interface SpawnInit {
  /** Short name for logs and errors, e.g. "rpc-server". */
  readonly name: string;
  readonly file: string;
  readonly args: readonly string[];
  /** Added to this process's environment. */
  readonly env?: Readonly<Record<string, string>>;
  readonly cwd?: string;
  /** Start with SIGPIPE ignored (default true: none of our children wants to die of a closed socket). */
  readonly ignoreSigpipe?: boolean;
  /** Grace between SIGTERM and SIGKILL when the node dies (default DEFAULT_STOP_GRACE_MS). */
  readonly orphanGraceMs?: number;
  readonly tailLines?: number;
  /** Child output goes here at debug level, one entry per line. */
  readonly logger?: Logger;
  /**
   * Called by stop() (and so by stopAll()) just before the SIGTERM: a program-specific polite request to
   * exit, e.g. a command on its stdin.
   */
  readonly beforeStop?: (p: ManagedProcess) => void;
  /**
   * Bytes for the program to read on fd 5 (a pipe, written and closed at once): secrets that must not show
   * in its command line or environment (llama.cpp's TLS keys, patch 0003).
   */
  readonly secretFd5?: string;
}

export interface ExitInfo {
  /** Exit status, or null when a signal ended it. */
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** Whether we asked it to stop (stop() / kill()); otherwise it exited or crashed by itself. */
  readonly requested: boolean;
  /** The last lines of its output (stdout and stderr, interleaved as they came). */
  readonly tail: readonly string[];
}

export type LineListener = (line: string, stream: 'stdout' | 'stderr') => void;

export interface ManagedProcess {
  readonly name: string;
  readonly pid: number;
  /** Resolves (never rejects) once the process has exited and its output is drained. */
  readonly exited: Promise<ExitInfo>;
  /** Null while it runs. */
  exitInfo(): ExitInfo | null;
  tail(): readonly string[];
  /** Writes to the program's stdin (its own pipe, not the watchdog's); ignored once it has exited. */
  writeStdin(text: string): void;
  /** Ends the program's stdin (EOF); the watchdog is not affected. */
  closeStdin(): void;
  /** Every output line from now on; returns an unsubscribe function. Earlier lines are in tail(). */
  onLine(listener: LineListener): () => void;
  /** Signals its whole process group. Marks the exit as requested. */
  kill(signal?: NodeJS.Signals): void;
  /** SIGTERM to the group, SIGKILL after `graceMs`; resolves when it has exited. Idempotent. */
  stop(graceMs?: number): Promise<ExitInfo>;
}

/** A child could not be started at all (missing binary, not executable). */
export class SpawnError extends Error {
  override readonly name = 'SpawnError';
}

const live = new Set<ManagedProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // 'exit' handlers must be synchronous: SIGKILL, nothing to wait for.
  process.on('exit', () => killAllSync('SIGKILL'));
}

/** Children started by this process that have not exited yet. */
export function liveProcesses(): readonly ManagedProcess[] {
  return [...live];
}

/** Signals every live child's process group at once, synchronously (for exit paths). */
export function killAllSync(signal: NodeJS.Signals = 'SIGKILL'): void {
  for (const p of live) p.kill(signal);
}

/**
 * Stops every live child (SIGTERM, then SIGKILL after `graceMs`), newest first, each after the previous one
 * has exited: what started later may depend on what started earlier (llama-server on the rpc-servers; with
 * its rpc-server killed under it, llama-server aborts instead of exiting cleanly).
 */
export async function stopAll(graceMs = DEFAULT_STOP_GRACE_MS): Promise<void> {
  for (const p of [...live].reverse()) await p.stop(graceMs);
}

/** Throws SpawnError unless `file` is an executable regular file. */
export function checkExecutable(file: string): void {
  try {
    if (!statSync(file).isFile()) throw new SpawnError(`${file} is not a file`);
    accessSync(file, fsConstants.X_OK);
  } catch (err) {
    if (err instanceof SpawnError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    throw new SpawnError(code === 'ENOENT' ? `${file} does not exist` : `${file} is not executable (${code})`);
  }
}

/** Starts `file args` under the watchdog. Throws SpawnError when it cannot start at all. */
export function spawnManaged(init: SpawnInit): ManagedProcess {
  checkExecutable(init.file);
  installExitHook();
  const tailMax = init.tailLines ?? DEFAULT_TAIL_LINES;
  const graceTenths = Math.max(1, Math.ceil((init.orphanGraceMs ?? DEFAULT_STOP_GRACE_MS) / 100));

  const sub = execa(
    'bash',
    ['-c', WATCHDOG, `mesh-${init.name}`, init.file, ...init.args],
    {
      env: {
        ...init.env,
        MESH_IGNORE_SIGPIPE: init.ignoreSigpipe === false ? '0' : '1',
        MESH_WATCHDOG_GRACE_TENTHS: String(graceTenths),
      },
      extendEnv: true,
      cwd: init.cwd,
      // 0: the watchdog's pipe; 3: the program's stdin; 5: secrets, when given (4 is the watchdog's own).
      stdio: init.secretFd5 === undefined ? ['pipe', 'pipe', 'pipe', 'pipe'] : ['pipe', 'pipe', 'pipe', 'pipe', 'ignore', 'pipe'],
      buffer: false,
      reject: false,
      detached: true,
      // Our own registry and watchdog do this job, for detached children too (execa's skips them).
      cleanup: false,
      // Our children run until we stop them; execa must not time them out or strip their output.
      stripFinalNewline: false,
    },
  );
  const pid = sub.pid;
  if (pid === undefined) {
    // execa reports spawn failures through the promise; bash itself missing is the only way here.
    void sub.catch(() => undefined);
    throw new SpawnError(`could not start ${init.name}: bash is not available`);
  }

  const tail: string[] = [];
  const listeners = new Set<LineListener>();
  let info: ExitInfo | null = null;
  let requested = false;
  let stopping: Promise<ExitInfo> | null = null;

  const pushLine = (line: string, stream: 'stdout' | 'stderr') => {
    tail.push(line);
    if (tail.length > tailMax) tail.splice(0, tail.length - tailMax);
    init.logger?.debug({ stream }, line);
    for (const l of listeners) {
      try {
        l(line, stream);
      } catch (err) {
        init.logger?.error({ err }, 'a line listener threw');
      }
    }
  };
  const drained = [lineReader(sub.stdout, 'stdout', pushLine), lineReader(sub.stderr, 'stderr', pushLine)];
  // Nothing is ever written to the watchdog's pipe: it exists only so that the watchdog sees EOF when we die.
  const watchdogPipe = sub.stdin;
  watchdogPipe.on('error', () => undefined);
  // The program's stdin (a socket pair, so writable from here although execa types it as output).
  if (init.secretFd5 !== undefined) {
    const secrets = (sub.stdio as unknown as unknown[])[5] as NodeJS.WritableStream & { on(e: 'error', f: () => void): unknown };
    secrets.on('error', () => undefined);
    secrets.end(init.secretFd5);
  }
  const programStdin = sub.stdio[3] as unknown as NodeJS.WritableStream & { writable: boolean; destroy(): void; on(e: 'error', f: () => void): unknown };
  programStdin.on('error', () => undefined);

  const exited = (async (): Promise<ExitInfo> => {
    const result = await sub;
    await Promise.all(drained);
    // Closing our end lets the watchdog subshell read EOF and exit (its target is already gone).
    watchdogPipe.destroy();
    programStdin.destroy();
    const signal = (result.signal ?? null) as NodeJS.Signals | null;
    info = { code: signal === null ? (result.exitCode ?? null) : null, signal, requested, tail: [...tail] };
    init.logger?.debug({ code: info.code, signal: info.signal, requested }, `${init.name} exited`);
    return info;
  })();

  const handle: ManagedProcess = {
    name: init.name,
    pid,
    exited,
    exitInfo: () => info,
    writeStdin(text) {
      if (info === null && programStdin.writable) programStdin.write(text);
    },
    closeStdin() {
      if (programStdin.writable) programStdin.end();
    },
    tail: () => [...tail],
    onLine(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    kill(signal = 'SIGTERM') {
      if (info !== null) return;
      requested = true;
      try {
        process.kill(-pid, signal);
      } catch {
        try {
          process.kill(pid, signal);
        } catch {
          // Already gone: the exit is on its way.
        }
      }
    },
    stop(graceMs = DEFAULT_STOP_GRACE_MS) {
      if (info !== null) return Promise.resolve(info);
      if (stopping !== null) return stopping;
      try {
        init.beforeStop?.(handle);
      } catch (err) {
        init.logger?.warn({ err }, 'beforeStop threw; stopping with signals only');
      }
      handle.kill('SIGTERM');
      const timer = setTimeout(() => handle.kill('SIGKILL'), graceMs);
      stopping = handle.exited.finally(() => clearTimeout(timer));
      return stopping;
    },
  };
  live.add(handle);
  // Registered before anyone else can await `exited`, so a caller never sees an exited child as live.
  void exited.then(() => live.delete(handle));
  init.logger?.debug({ pid, file: init.file, args: init.args }, `${init.name} started`);
  return handle;
}

/**
 * The few output lines that best say why a child ended: its error-looking lines if any (a child's stdout
 * is block-buffered while stderr is not, so the tail's order cannot be trusted), else its last lines.
 */
export function summarizeTail(tail: readonly string[], max = 3, skip: (line: string) => boolean = () => false): string[] {
  // Backtrace frames ("#2  0x... in ggml_abort ()") say where, not why.
  const lines = tail.map((l) => l.trim()).filter((l) => l !== '' && !/^#\d+\s+0x/.test(l) && !skip(l));
  const errors = lines.filter((l) => /error|fail|abort|invalid|unknown|couldn't|cannot|unable|exception|no devices/i.test(l));
  return (errors.length > 0 ? errors : lines).slice(-max);
}

async function lineReader(
  stream: NodeJS.ReadableStream,
  name: 'stdout' | 'stderr',
  onLine: (line: string, stream: 'stdout' | 'stderr') => void,
): Promise<void> {
  let pending = '';
  stream.setEncoding('utf8');
  try {
    for await (const chunk of stream as AsyncIterable<string>) {
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        onLine(pending.slice(0, nl).replace(/\r$/, ''), name);
        pending = pending.slice(nl + 1);
      }
      // A program that never prints a newline must not grow this without bound.
      if (pending.length > 64 * 1024) {
        onLine(pending, name);
        pending = '';
      }
    }
  } catch {
    // A destroyed pipe ends the stream; what was read is kept.
  }
  if (pending !== '') onLine(pending, name);
}
