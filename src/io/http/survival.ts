// Request survival, the I/O part: the node whose API received a plain chat or completion request owns it until
// it ends. It asks the mesh's host for the chat template once (`/apply-template`), then generates through
// llama-server's `/completion` with token ids back, and answers in OpenAI's shapes itself. When the plan
// changes under it (a stage dies, the host dies, a restart), the stream from the host is cut: the owner waits
// for the mesh to serve again (the resolver, bounded), re-submits the prompt with the confirmed ids and the
// remaining max_tokens, and splices the continuation into the same answer (same id, nothing repeated or
// missing, one finish_reason). What can survive and how: src/machines/continuation.ts.
//
// Bounds: the whole wait for the mesh across cuts (`budgetMs`, default 120 s); a continuation that reaches the
// host and is cut again before it confirms one new token counts as a crash of its own making, and the second
// such ends the request with a clean error instead of a third try.
import { randomBytes } from 'node:crypto';
import type { Agent, IncomingMessage } from 'node:http';
import { StringDecoder } from 'node:string_decoder';
import type { Writable } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { ContinuationMismatch, Generation, openaiAnswer, openaiChunk, parseLlamaEvent, usageOf, type AnswerIds, type SurvivalPlan } from '../../machines/continuation.ts';
import type { RequestFinished, RequestStarted } from '../../machines/mesh-events.ts';
import { abandon, describeNetError, readAll, replyUnavailable, upstreamCall, type Upstream } from './api-proxy.ts';
import { apiError } from './api-request.ts';

export interface SurvivalInit {
  /** Where the next attempt goes (waits while the mesh restarts; `unavailable` when its own bound passes). */
  readonly resolve: (signal: AbortSignal) => Promise<Upstream>;
  readonly agent: Agent;
  /** Across all cuts, how long the request may wait for the mesh to serve again. */
  readonly budgetMs?: number;
  /** Each request as it starts, is continued and ends, with its tokens and speed (the node's /api/events). */
  readonly onRequest?: (report: RequestReport) => void;
}

/** What `onRequest` hears: a request started, continued after a cut, finished (however it ended). */
export type RequestReport =
  | ({ readonly phase: 'started' } & RequestStarted)
  | { readonly phase: 'continued'; readonly id: string; readonly attempt: number; readonly confirmedTokens: number; readonly reason: string }
  | ({ readonly phase: 'finished' } & RequestFinished);

const DEFAULT_BUDGET_MS = 120_000;
const MAX_FRUITLESS_CONTINUATIONS = 2;

/** A failure worth continuing after (the mesh changed under the request), with what happened. */
class Cut extends Error {
  override name = 'Cut';
  constructor(
    message: string,
    /** The attempt reached llama-server (a stream began) before it was cut. */
    readonly reached: boolean,
  ) {
    super(message);
  }
}

/** A final answer from upstream that is not a cut: a 4xx passed on as it came. */
class Refusal extends Error {
  override name = 'Refusal';
  constructor(
    readonly status: number,
    readonly body: Buffer,
    readonly contentType: string,
  ) {
    super(`upstream answered ${status}`);
  }
}

export async function serveSurvivable(request: FastifyRequest, reply: FastifyReply, plan: SurvivalPlan, init: SurvivalInit): Promise<FastifyReply> {
  const g = new Generation(plan);
  const ids: AnswerIds = {
    id: `${plan.route === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomBytes(12).toString('base64url')}`,
    created: Math.floor(Date.now() / 1000),
    model: plan.model ?? 'mesh-inference',
  };
  const raw = reply.raw;
  const client = new AbortController();
  const onClose = () => {
    if (!raw.writableFinished) client.abort(new Error('client disconnected'));
  };
  raw.once('close', onClose);
  const deadline = Date.now() + (init.budgetMs ?? DEFAULT_BUDGET_MS);
  let streaming = false;
  let promptText: string | null = plan.route === 'completion' ? plan.prompt! : null;
  let fruitless = 0;
  let lastCut = '';
  let attemptStart = 0;
  const started: RequestStarted = { id: ids.id, route: plan.route, stream: plan.stream, maxTokens: plan.maxTokens, startedAt: Date.now() };
  let firstTokenAt: number | null = null;
  let failure: string | null = null;
  init.onRequest?.({ phase: 'started', ...started });

  const emit = (payload: unknown) => {
    if (!raw.destroyed) raw.write(`data: ${JSON.stringify(payload)}\n\n`);
  };
  const startStream = () => {
    reply.hijack();
    raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    emit(openaiChunk(plan, ids, plan.route === 'chat' ? '' : null, null, plan.route === 'chat'));
    streaming = true;
  };
  const fail = (status: number, message: string, code: string): FastifyReply => {
    failure = message;
    request.log.warn({ id: ids.id, generated: g.completionTokens, problem: message }, 'request could not be finished');
    if (streaming) {
      if (!raw.destroyed) {
        raw.write(`event: error\ndata: ${JSON.stringify(apiError(message, 'server_error', code))}\n\n`);
        raw.end();
      }
      return reply;
    }
    if (status === 503) return replyUnavailable(reply, { kind: 'unavailable', reason: message, retryAfterS: 5 });
    return reply.code(status).send(apiError(message, 'server_error', code));
  };

  try {
    for (;;) {
      if (client.signal.aborted) return abandon(reply);
      const waitLeft = deadline - Date.now();
      if (g.attempts > 0 && waitLeft <= 0) return fail(503, `the mesh did not serve again within ${Math.round((init.budgetMs ?? DEFAULT_BUDGET_MS) / 1000)} s after: ${lastCut}`, 'mesh_unavailable');
      const up = await init.resolve(AbortSignal.any([client.signal, AbortSignal.timeout(Math.max(1_000, waitLeft))]));
      if (client.signal.aborted) return abandon(reply);
      if (up.kind === 'unavailable') {
        if (g.attempts === 0 && !streaming) return replyUnavailable(reply, up);
        lastCut = up.reason;
        await pause(1_000, client.signal);
        continue;
      }
      try {
        promptText ??= await applyTemplate(init.agent, up, plan, client.signal);
        attemptStart = g.generated;
        const continuing = g.attempts > 0;
        const body = Buffer.from(JSON.stringify(g.nextRequest(promptText)));
        if (continuing) {
          init.onRequest?.({ phase: 'continued', id: ids.id, attempt: g.attempts, confirmedTokens: attemptStart, reason: lastCut });
          request.log.info({ id: ids.id, attempt: g.attempts, confirmedTokens: attemptStart, after: lastCut }, 'continuing the request on the mesh as it is now');
        }
        await generate(init.agent, up, body, client.signal, raw, (event) => {
          const text = g.take(event);
          if (firstTokenAt === null && g.completionTokens > 0) firstTokenAt = Date.now();
          if (!plan.stream) return;
          if (!streaming) startStream();
          if (text !== '') emit(openaiChunk(plan, ids, text, null));
        });
        if (g.finish === null) throw new Cut('the model server ended the stream without its last event', true);
        break;
      } catch (err) {
        if (client.signal.aborted) return abandon(reply);
        if (err instanceof Refusal) {
          if (!streaming) return reply.code(err.status).header('content-type', err.contentType).send(err.body);
          return fail(502, `the model server refused the continuation (HTTP ${err.status})`, 'continuation_refused');
        }
        if (err instanceof ContinuationMismatch) return fail(502, `the request could not be continued exactly: ${err.message}`, 'continuation_mismatch');
        const cut = err instanceof Cut ? err : new Cut(describeNetError(err), false);
        lastCut = cut.message;
        if (g.finish !== null) break; // the last event came before the connection went: the answer is whole
        if (g.exhausted) {
          g.finish = 'length';
          break;
        }
        // A continuation that reached the host and was cut before one new confirmed token: its own doing, maybe.
        if (cut.reached && g.attempts > 1 && g.generated === attemptStart) fruitless++;
        if (fruitless >= MAX_FRUITLESS_CONTINUATIONS) return fail(502, `the continuation itself was cut twice without progress (${cut.message}); not trying a third time`, 'continuation_failed');
        request.log.warn({ id: ids.id, generated: g.completionTokens, confirmed: g.generated, problem: cut.message }, 'the mesh cut the request; it will continue once the mesh serves');
        await pause(500, client.signal);
      }
    }
    if (!plan.stream) return reply.code(200).send(openaiAnswer(g, ids));
    if (!streaming) startStream();
    emit(openaiChunk(plan, ids, null, g.finish));
    if (plan.includeUsage) emit({ id: ids.id, object: plan.route === 'chat' ? 'chat.completion.chunk' : 'text_completion', created: ids.created, model: ids.model, choices: [], usage: usageOf(g) });
    if (!raw.destroyed) {
      raw.write('data: [DONE]\n\n');
      raw.end();
    }
    return reply;
  } finally {
    raw.off('close', onClose);
    if (init.onRequest !== undefined) {
      const end = Date.now();
      const n = g.completionTokens;
      const outcome = failure !== null ? 'failed' : g.finish !== null ? String(g.finish) : client.signal.aborted ? 'abandoned' : 'failed';
      init.onRequest({
        phase: 'finished',
        ...started,
        outcome,
        promptTokens: g.promptTokens,
        completionTokens: n,
        durationMs: end - started.startedAt,
        firstTokenMs: firstTokenAt === null ? null : firstTokenAt - started.startedAt,
        tokensPerSecond: firstTokenAt !== null && n >= 2 && end > firstTokenAt ? Math.round(((n - 1) / ((end - firstTokenAt) / 1000)) * 10) / 10 : null,
        continuations: Math.max(0, g.attempts - 1),
        error: failure ?? (outcome === 'failed' && lastCut !== '' ? lastCut : null),
      });
    }
  }
}

async function applyTemplate(agent: Agent, up: Extract<Upstream, { kind: 'url' }>, plan: SurvivalPlan, signal: AbortSignal): Promise<string> {
  const body = Buffer.from(JSON.stringify({ messages: plan.messages, ...plan.templateFields }));
  const res = await post(agent, up, '/apply-template', body, signal);
  const data = await readWhole(res);
  if (res.statusCode !== 200) throw statusFailure(res, data);
  const prompt = (JSON.parse(data.toString('utf8')) as { prompt?: unknown }).prompt;
  if (typeof prompt !== 'string') throw new Refusal(502, Buffer.from(JSON.stringify(apiError('the chat template gave no prompt', 'server_error', 'template_failed'))), 'application/json');
  return prompt;
}

/**
 * One streamed `/completion`: each event to `onEvent`; resolves at the stream's end (a cut throws a Cut). A
 * client that reads slower than the model writes (`client` needs a drain) slows the read, not our memory.
 */
async function generate(
  agent: Agent,
  up: Extract<Upstream, { kind: 'url' }>,
  body: Buffer,
  signal: AbortSignal,
  client: Writable,
  onEvent: Parameters<typeof parseEvents>[1],
): Promise<void> {
  const res = await post(agent, up, '/completion', body, signal);
  if (res.statusCode !== 200 || !String(res.headers['content-type'] ?? '').includes('text/event-stream')) throw statusFailure(res, await readWhole(res).catch(() => Buffer.alloc(0)));
  await new Promise<void>((resolve, reject) => {
    const parse = parseEvents(res, onEvent, reject);
    res.on('data', (chunk: Buffer) => {
      parse(chunk);
      if (client.writableNeedDrain && !client.destroyed) {
        res.pause();
        client.once('drain', () => res.resume());
      }
    });
    res.on('end', () => (res.complete ? resolve() : reject(new Cut('the model server closed the connection mid-answer', true))));
    res.on('error', (err) => reject(new Cut(`the model server connection failed (${describeNetError(err)})`, true)));
    res.on('aborted', () => reject(new Cut('the model server closed the connection mid-answer', true)));
  });
}

/** An SSE parser over llama-server's stream: `data:` lines to events; an `error` event or an error payload is a cut. */
function parseEvents(res: IncomingMessage, onEvent: (event: NonNullable<ReturnType<typeof parseLlamaEvent>>) => void, reject: (err: unknown) => void): (chunk: Buffer) => void {
  let carry = '';
  let failed = false;
  let eventName = '';
  const utf8 = new StringDecoder('utf8'); // a character split across chunks stays whole
  return (chunk) => {
    if (failed) return;
    const lines = (carry + utf8.write(chunk)).split('\n');
    carry = lines.pop() ?? '';
    for (const line of lines) {
      if (line.startsWith('event:')) eventName = line.slice(6).trim();
      if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim();
      const event = eventName === 'error' ? null : parseLlamaEvent(data);
      eventName = '';
      if (event === null) {
        failed = true;
        res.destroy();
        reject(new Cut(`the model server sent an error: ${data.slice(0, 200)}`, true));
        return;
      }
      try {
        onEvent(event);
      } catch (err) {
        failed = true;
        res.destroy();
        reject(err);
        return;
      }
    }
  };
}

/** The proxy's upstream call; a failure to reach the host is a cut before anything reached it. */
async function post(agent: Agent, up: Extract<Upstream, { kind: 'url' }>, path: string, body: Buffer, signal: AbortSignal): Promise<IncomingMessage> {
  try {
    return await upstreamCall(agent, up, 'POST', path, body, signal);
  } catch (err) {
    throw new Cut(`the model server is not reachable (${describeNetError(err)})`, false);
  }
}

/** The proxy's whole-body read; an answer cut short is a cut after the host was reached. */
async function readWhole(res: IncomingMessage): Promise<Buffer> {
  try {
    return await readAll(res);
  } catch (err) {
    throw new Cut(`the model server failed mid-answer (${describeNetError(err)})`, true);
  }
}

/** 4xx: the request's own problem, passed on; 5xx: the mesh's (restarting, crashed), continued after. */
function statusFailure(res: IncomingMessage, data: Buffer): Error {
  const status = res.statusCode ?? 502;
  if (status >= 400 && status < 500 && status !== 408 && status !== 429) return new Refusal(status, data, String(res.headers['content-type'] ?? 'application/json'));
  return new Cut(`the model server answered ${status}: ${data.toString('utf8').slice(0, 200)}`, status !== 503);
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => (clearTimeout(t), resolve()), { once: true });
  });
}

