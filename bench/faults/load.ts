// The fault benchmark's traffic: greedy chat completions (temperature 0, ignore_eos, fixed max_tokens), streamed
// and not, each classified against the reference text of its prompt (bench/faults.bench.ts says what each
// outcome means), and the probe that times "serving again".
import OpenAI, { APIConnectionError, APIError } from 'openai';
import type { E2eNode } from '../../test/e2e-support.ts';

export const MAX_TOKENS = 48;
/** The serving-again probe asks for this few tokens (it still queues behind the load at the host's one slot). */
export const PROBE_TOKENS = 4;
/** A request still running after this long is lost (hung). */
export const HANG_BOUND_MS = 180_000;
export const PROMPTS = [
  'Tell me about meshes of machines.',
  'Write a short story about a lighthouse.',
  'List the planets and say one thing about each.',
  'Explain pipelines to a child.',
];

export type Outcome = 'same' | 'different' | 'duplicated' | 'clean-error' | 'broken' | 'lost';

export interface RequestResult {
  readonly entry: string;
  readonly stream: boolean;
  readonly prompt: number;
  readonly startedAt: number;
  readonly endedAt: number;
  readonly outcome: Outcome;
  readonly text: string;
  readonly detail: string;
  /** Streamed: chunks received, distinct ids. */
  readonly chunks: number;
  readonly ids: number;
}

const body = (prompt: number, stream: boolean, maxTokens: number) => ({
  model: 'mesh',
  messages: [{ role: 'user', content: PROMPTS[prompt]! }],
  max_tokens: maxTokens,
  temperature: 0,
  ignore_eos: true,
  stream,
});

export function client(node: E2eNode): OpenAI {
  return new OpenAI({ baseURL: `${node.api}/v1`, apiKey: 'none', maxRetries: 0, timeout: HANG_BOUND_MS + 10_000 });
}

/**
 * The answer repeated a stretch: it is not the reference, and either the reference is a proper prefix of it (it
 * went on past the reference's end), or after the longest prefix it shares with the reference it goes on with 8+
 * characters that the reference had already given before that point (a stretch sent again). Being longer alone
 * is no duplicate: greedy text that took another token somewhere has another length.
 */
export function repeatsStretch(text: string, ref: string): boolean {
  if (text === ref) return false;
  const p = commonPrefix(text, ref);
  if (p === ref.length) return true;
  const rest = text.slice(p, p + 8);
  return rest.length === 8 && ref.slice(0, p).includes(rest);
}

export function commonPrefix(a: string, b: string): number {
  let p = 0;
  while (p < a.length && p < b.length && a[p] === b[p]) p++;
  return p;
}

/** One request through `node`; never throws. `refs[prompt]` is the undisturbed text (null while making them). */
export async function one(node: E2eNode, prompt: number, stream: boolean, refs: readonly (string | null)[], maxTokens = MAX_TOKENS): Promise<RequestResult> {
  const startedAt = Date.now();
  const hang = new AbortController();
  let hung = false;
  const timer = setTimeout(() => ((hung = true), hang.abort()), HANG_BOUND_MS);
  let text = '';
  let chunks = 0;
  const ids = new Set<string>();
  const finishes: string[] = [];
  let error: unknown = null;
  try {
    if (stream) {
      const s = await client(node).chat.completions.create(body(prompt, true, maxTokens) as never, { signal: hang.signal });
      for await (const c of s as unknown as AsyncIterable<{ id: string; choices: { delta?: { content?: string }; finish_reason: string | null }[] }>) {
        chunks++;
        ids.add(c.id);
        const ch = c.choices[0];
        if (ch?.delta?.content) text += ch.delta.content;
        if (ch?.finish_reason) finishes.push(ch.finish_reason);
      }
    } else {
      const r = (await client(node).chat.completions.create(body(prompt, false, maxTokens) as never, { signal: hang.signal })) as unknown as {
        id: string;
        choices: { message: { content: string | null }; finish_reason: string | null }[];
      };
      ids.add(r.id);
      text = r.choices[0]?.message.content ?? '';
      if (r.choices[0]?.finish_reason) finishes.push(r.choices[0].finish_reason);
    }
  } catch (err) {
    error = err;
  } finally {
    clearTimeout(timer);
  }
  const ref = refs[prompt] ?? null;
  let outcome: Outcome;
  let detail = '';
  if (hung) {
    outcome = 'lost';
    detail = `no end within ${HANG_BOUND_MS / 1000} s`;
  } else if (error !== null) {
    const e = error as Error & { status?: number };
    // An HTTP status or an SSE error event is a clean error; a connection that failed without either is "broken".
    outcome = error instanceof APIError && !(error instanceof APIConnectionError) ? 'clean-error' : 'broken';
    detail = `${e.status ?? ''} ${e.message}`.trim().slice(0, 160);
  } else if (finishes.length === 0) {
    outcome = 'lost';
    detail = `ended without finish_reason after ${chunks} chunks`;
  } else if (ids.size > 1 || finishes.length > 1 || (ref !== null && repeatsStretch(text, ref))) {
    outcome = 'duplicated';
    detail = `ids ${ids.size}, finishes ${finishes.join(',')}, ${text.length} chars against ${ref?.length}, shared prefix ${commonPrefix(text, ref ?? '')}`;
  } else {
    outcome = ref === null || text === ref ? 'same' : 'different';
    if (outcome === 'different') detail = `differs from char ${commonPrefix(text, ref!)} of ${ref!.length}`;
  }
  return { entry: node.name, stream, prompt, startedAt, endedAt: Date.now(), outcome, text, detail, chunks, ids: ids.size };
}

/** The steady mix: per entry node `perEntry` loops, each alternating streamed and non-streamed over the prompts. */
export class Load {
  readonly results: RequestResult[] = [];
  readonly inFlight = new Map<number, { entry: string; stream: boolean; startedAt: number }>();
  private stopped = false;
  private readonly loops: Promise<void>[] = [];
  private seq = 0;

  constructor(
    private readonly refs: readonly string[],
  ) {}

  start(entries: readonly E2eNode[], perEntry = 2): void {
    entries.forEach((node, ei) => {
      for (let k = 0; k < perEntry; k++) this.loops.push(this.loop(node, ei * perEntry + k));
    });
  }

  private async loop(node: E2eNode, lane: number): Promise<void> {
    for (let i = 0; !this.stopped; i++) {
      const id = this.seq++;
      // Every prompt both streamed and not: lane 0 goes p0 s, p0 n, p1 s, p1 n, ...; lane 1 starts elsewhere.
      const stream = (i + lane) % 2 === 0;
      this.inFlight.set(id, { entry: node.name, stream, startedAt: Date.now() });
      const r = await one(node, (Math.floor(i / 2) + lane) % PROMPTS.length, stream, this.refs);
      this.inFlight.delete(id);
      this.results.push(r);
      // A node that refuses at once (503 while restarting) should not be hammered: a short pause after errors.
      if (r.outcome !== 'same' && r.outcome !== 'different') await sleep(500);
    }
  }

  /** Stops starting requests; resolves once every request in flight has ended (each bounded by HANG_BOUND_MS). */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }
}

/** From `t0` until a fresh non-streamed request through `node` completes: ms, or null when none did within `boundMs`. */
export async function timeToServe(node: E2eNode, t0: number, boundMs = HANG_BOUND_MS): Promise<number | null> {
  while (Date.now() - t0 < boundMs) {
    const r = await one(node, 0, false, [], PROBE_TOKENS);
    if (r.outcome === 'same' || r.outcome === 'different') return r.endedAt - t0;
    await sleep(500);
  }
  return null;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
