// Is a child still working? The probes behind the process actor's liveness watch (src/actors/process.actor.ts):
// llama-server answers GET /health from its own HTTP threads, also while it computes (a long prefill
// included); an rpc-server serves one client at a time, so a probe over its port would queue behind
// llama-server's connection and look like a hang: for it, the kernel's view of the process (/proc, Linux).
import { readFile } from 'node:fs/promises';
import { checkHealth } from './llama-server-process.ts';

/** The bounds the node uses (docs/node.md, "Liveness and back-off"): a probe every 2 s, 3 misses in a row. */
export const LIVENESS_INTERVAL_MS = 2_000;
export const LIVENESS_MISSES = 3;
/** One /health probe of llama-server gets this long to answer. */
export const HEALTH_PROBE_TIMEOUT_MS = 2_000;

/**
 * The scheduler state of `pid` from /proc/<pid>/stat ('R', 'S', 'D', 'T' stopped, 't' traced, 'Z'...); null
 * where there is no /proc (macOS) or the process is gone.
 */
export async function processRunState(pid: number): Promise<string | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state.length === 1 ? state : null;
  } catch {
    return null;
  }
}

/** Why `pid` cannot be working (stopped by a signal or a tracer), or null (running, or no way to tell). */
export async function stoppedReason(pid: number): Promise<string | null> {
  const state = await processRunState(pid);
  if (state === 'T') return `process ${pid} is stopped (SIGSTOP/SIGTSTP: /proc state T)`;
  if (state === 't') return `process ${pid} is stopped by a tracer (/proc state t)`;
  return null;
}

/** llama-server's probe: null when GET /health answers at all (200, or 503 while loading) within the bound. */
export async function llamaServerAlive(url: string, pid: number, signal: AbortSignal, timeoutMs = HEALTH_PROBE_TIMEOUT_MS): Promise<string | null> {
  const health = await checkHealth(url, timeoutMs, signal);
  if (health.kind !== 'down') return null;
  const stopped = await stoppedReason(pid);
  const why = /abort|timeout/i.test(health.reason) ? `no answer within ${timeoutMs} ms` : health.reason;
  return `/health: ${why}${stopped !== null ? ` (${stopped})` : ''}`;
}
