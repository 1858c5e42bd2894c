// What llama-server prints and how it ends: router-child progress lines, patch 0001's "weights sent as bytes"
// lines and their tally per rpc-server, and start failures and crashes as one line with their log tail.
import { summarizeTail, type ExitInfo } from './processes.ts';

export interface LlamaLoadProgress {
  /** `starting`: connecting to the rpc-servers; `loading`: weights; `ready`: /health is ok. */
  readonly phase: 'starting' | 'loading' | 'ready';
  /** 0..1 while loading (null when the server does not say). */
  readonly fraction: number | null;
}

/** One `RPC[host:port]: weights sent as bytes: 'NAME' N bytes (REASON)` line of patch 0001's client. */
export interface WeightsSentAsBytes {
  /** The rpc-server, exactly as in `--rpc`. */
  readonly endpoint: string;
  readonly name: string;
  readonly bytes: number;
  /** Why: the server's refusal ("content differs", "unknown tensor name"...) or "not asked: ..." once given up on. */
  readonly reason: string;
}

/** What crossed the network as bytes to one rpc-server, though it could have loaded it from its own GGUF. */
export interface WeightsOverWire {
  /** Distinct weights (a weight uploaded in pieces counts once). */
  readonly tensors: number;
  readonly bytes: number;
  /** The first WEIGHTS_OVER_WIRE_NAMES of them, in upload order. */
  readonly names: readonly string[];
}

export const WEIGHTS_OVER_WIRE_NAMES = 20;

/** The prefix of a router child's state lines on stdout ("cmd_child_to_router:state:{json}"). */
export const PROGRESS_PREFIX = 'cmd_child_to_router:state:';

/** What every such line contains: a cheap test before the regular expression. */
export const WEIGHTS_SENT_MARK = ': weights sent as bytes: ';
// After llama.cpp's log prefix (timestamp, level letter) and any colour codes: see patch 0001's rpc_log_weight_bytes.
const WEIGHTS_SENT_LINE = /RPC\[([^\]\s]+)\]: weights sent as bytes: '(.*)' (\d+) bytes \((.*)\)$/;

/** Parses patch 0001's "weights sent as bytes" line (with or without llama.cpp's log prefix); null for others. */
export function parseWeightsSentAsBytes(line: string): WeightsSentAsBytes | null {
  const m = WEIGHTS_SENT_LINE.exec(line.replace(/\x1b\[[0-9;]*m/g, '').trimEnd());
  if (m === null) return null;
  const bytes = Number(m[3]);
  if (!Number.isSafeInteger(bytes)) return null;
  return { endpoint: m[1]!, name: m[2]!, bytes, reason: m[4]! };
}

/** Sums WeightsSentAsBytes per key (an endpoint, or the worker behind it). */
export class WeightsOverWireTally {
  readonly #by = new Map<string, { names: Set<string>; bytes: number; first: string[] }>();

  add(key: string, w: Pick<WeightsSentAsBytes, 'name' | 'bytes'>): void {
    let t = this.#by.get(key);
    if (t === undefined) this.#by.set(key, (t = { names: new Set(), bytes: 0, first: [] }));
    t.bytes += w.bytes;
    if (!t.names.has(w.name)) {
      t.names.add(w.name);
      if (t.first.length < WEIGHTS_OVER_WIRE_NAMES) t.first.push(w.name);
    }
  }

  snapshot(): Record<string, WeightsOverWire> {
    const out: Record<string, WeightsOverWire> = {};
    for (const [key, t] of this.#by) out[key] = { tensors: t.names.size, bytes: t.bytes, names: [...t.first] };
    return out;
  }
}

/** Parses one router-child state line; null for states other than loading / ready. */
export function parseProgressLine(line: string): LlamaLoadProgress | null {
  try {
    const msg = JSON.parse(line.slice(PROGRESS_PREFIX.length)) as { state?: string; payload?: { value?: unknown } };
    if (msg.state === 'loading') {
      const v = msg.payload?.value;
      return { phase: 'loading', fraction: typeof v === 'number' && v >= 0 && v <= 1 ? v : null };
    }
    if (msg.state === 'ready') return { phase: 'ready', fraction: 1 };
  } catch {
    // Not JSON after all: not a progress line.
  }
  return null;
}

/** Start failures and crashes: `message` is one line for logs and status; `tail` the last output lines. */
export class LlamaServerError extends Error {
  override readonly name = 'LlamaServerError';
  constructor(
    message: string,
    readonly exit: ExitInfo | null = null,
    readonly tail: readonly string[] = [],
  ) {
    super(message);
  }
}

/** One line on how it ended: status or signal, what that usually means, and its last error lines. */
export function describeExit(exit: ExitInfo, when: string): string {
  const how = exit.signal !== null ? `was killed by ${exit.signal}` : `exited with status ${exit.code}`;
  const why =
    exit.code === 134 || exit.signal === 'SIGABRT'
      ? ' (llama.cpp aborted: an rpc-server is unreachable, vanished or refused)'
      : exit.code === 141 || exit.signal === 'SIGPIPE'
        ? ' (SIGPIPE: a socket closed under it)'
        : '';
  const shown = summarizeTail(exit.tail, 3, (l) => l.startsWith(PROGRESS_PREFIX));
  return `llama-server ${how} ${when}${why}${shown.length > 0 ? `: ${shown.join(' | ')}` : ''}`;
}
