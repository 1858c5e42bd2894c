// Proxying to the upstream a resolver picks (the local llama-server, or a local port of the mesh's http
// tunnel): the resolver's wait bounded, whole answers passed on whole, SSE streamed chunk by chunk.
//
// Failure rules: no route yet -> 503 with Retry-After and the reason; the client goes away -> the upstream
// request is aborted (llama-server stops generating); the upstream dies mid-stream -> the stream ends with
// an SSE `error` event and no `[DONE]` (OpenAI clients throw on it), never a silent truncation or a hang.
import { Agent, request as httpRequest, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { apiError } from './api-request.ts';

/** Where a request goes, as the resolver decides it. */
export type Upstream =
  | {
      readonly kind: 'url';
      /** "http://127.0.0.1:PORT": the local llama-server, or a local port of the mesh's http tunnel. */
      readonly baseUrl: string;
      /** Extra headers for the upstream (an api key of the host's API, say); the client's are not forwarded. */
      readonly headers?: Readonly<Record<string, string>>;
    }
  | {
      readonly kind: 'unavailable';
      /** For people: "the mesh is restarting", "need 12.1 GB of VRAM, the mesh has 8.0 GB". */
      readonly reason: string;
      readonly retryAfterS: number;
    };

/**
 * Decides where one request goes. May wait (the mesh restarting) and should answer `unavailable` itself when
 * its own bound passes; it must stop waiting when `signal` aborts (client gone, or the server's own bound).
 */
export type UpstreamResolver = (request: { readonly path: string; readonly signal: AbortSignal }) => Promise<Upstream>;

/**
 * Asks `resolver` where a request goes, bounded by `timeoutMs` and by the client staying: either ending
 * answers `unavailable`, and so does a resolver that throws.
 */
export async function resolveUpstream(
  resolver: UpstreamResolver,
  request: FastifyRequest,
  reply: FastifyReply,
  path: string,
  timeoutMs: number,
): Promise<Upstream> {
  const ctrl = new AbortController();
  const onClose = () => ctrl.abort(new Error('client disconnected'));
  reply.raw.once('close', onClose);
  const timer = setTimeout(() => ctrl.abort(new Error('timeout')), timeoutMs);
  try {
    const up = await Promise.race([
      resolver({ path, signal: ctrl.signal }),
      new Promise<Upstream>((r) =>
        ctrl.signal.addEventListener('abort', () => r({ kind: 'unavailable', reason: 'the mesh is not ready (waited too long)', retryAfterS: 5 }), { once: true }),
      ),
    ]);
    return up;
  } catch (err) {
    request.log.warn({ err }, 'upstream resolver failed');
    return { kind: 'unavailable', reason: `no route: ${(err as Error).message}`, retryAfterS: 5 };
  } finally {
    clearTimeout(timer);
    reply.raw.off('close', onClose);
  }
}

/** 503 with Retry-After and the resolver's reason. */
export function replyUnavailable(reply: FastifyReply, up: Extract<Upstream, { kind: 'unavailable' }>): FastifyReply {
  return reply
    .code(503)
    .header('retry-after', String(Math.max(1, Math.ceil(up.retryAfterS))))
    .send(apiError(up.reason, 'server_error', 'mesh_unavailable'));
}

/** GET /health: ok when the upstream's own /health says 200, else 503 with the reason. */
export async function proxyHealth(reply: FastifyReply, agent: Agent, up: Upstream): Promise<FastifyReply> {
  if (up.kind === 'unavailable') {
    return reply.code(503).header('retry-after', String(Math.max(1, up.retryAfterS))).send({ status: 'unavailable', reason: up.reason });
  }
  try {
    const res = await upstreamCall(agent, up, 'GET', '/health', null, AbortSignal.timeout(5_000));
    const body = await readAll(res);
    if (res.statusCode === 200) return reply.send({ status: 'ok' });
    return reply.code(503).header('retry-after', '5').send({ status: 'unavailable', reason: res.statusCode === 503 ? 'the model is loading' : `the model server answered ${res.statusCode}: ${body.toString('utf8').slice(0, 200)}` });
  } catch (err) {
    return reply.code(503).header('retry-after', '5').send({ status: 'unavailable', reason: `the model server is not reachable (${describeNetError(err)})` });
  }
}

export function upstreamCall(
  agent: Agent,
  up: Extract<Upstream, { kind: 'url' }>,
  method: 'GET' | 'POST',
  path: string,
  body: Buffer | null,
  signal: AbortSignal,
): Promise<IncomingMessage> {
  const url = new URL(path, up.baseUrl.endsWith('/') ? up.baseUrl : `${up.baseUrl}/`);
  const headers: OutgoingHttpHeaders = { ...up.headers, accept: '*/*' };
  if (body !== null) {
    headers['content-type'] = 'application/json';
    headers['content-length'] = body.length;
  }
  const attempt = (retriesLeft: number): Promise<IncomingMessage> =>
    new Promise((resolve, reject) => {
      const req = httpRequest(url, { method, headers, agent, signal });
      req.once('response', resolve);
      req.once('error', (err: NodeJS.ErrnoException) => {
        // A kept-alive socket that llama-server closed meanwhile (it does after a stream): the request never
        // reached it, so sending it again on a fresh socket is safe (Node's documented `reusedSocket` retry).
        if (req.reusedSocket && (err.code === 'ECONNRESET' || err.code === 'EPIPE') && retriesLeft > 0 && !signal.aborted) {
          resolve(attempt(retriesLeft - 1));
        } else reject(err);
      });
      req.end(body ?? undefined);
    });
  return attempt(2);
}

export async function readAll(res: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  if (!res.complete) throw new Error('the upstream response was cut off');
  return Buffer.concat(chunks);
}

/** Whole-body proxying (non-streaming requests, /v1/models): a cut answer becomes a 502, never half a JSON. */
export async function proxyBuffered(
  request: FastifyRequest,
  reply: FastifyReply,
  agent: Agent,
  up: Extract<Upstream, { kind: 'url' }>,
  method: 'GET' | 'POST',
  path: string,
  body: Buffer | null,
): Promise<FastifyReply> {
  const ctrl = new AbortController();
  const onClose = () => {
    if (!reply.raw.writableFinished) ctrl.abort(new Error('client disconnected'));
  };
  reply.raw.once('close', onClose);
  try {
    const res = await upstreamCall(agent, up, method, path, body, ctrl.signal);
    const data = await readAll(res);
    return reply
      .code(res.statusCode ?? 502)
      .header('content-type', res.headers['content-type'] ?? 'application/json')
      .send(data);
  } catch (err) {
    if (ctrl.signal.aborted) return abandon(reply); // nobody is listening any more
    request.log.warn({ err, path }, 'upstream request failed');
    if (isConnectError(err)) {
      return reply.code(503).header('retry-after', '5').send(apiError(`the model server is not reachable (${describeNetError(err)}); the mesh may be restarting`, 'server_error', 'upstream_unavailable'));
    }
    return reply.code(502).send(apiError(`the model server failed mid-answer (${describeNetError(err)})`, 'server_error', 'upstream_failed'));
  } finally {
    reply.raw.off('close', onClose);
  }
}

/**
 * SSE proxying: chunks are written as they arrive; a stream that ends without its last event (`[DONE]` for
 * the OpenAI routes, an event with `"stop":true` for llama-server's /completion) gets an error event.
 */
export async function proxyStream(
  request: FastifyRequest,
  reply: FastifyReply,
  agent: Agent,
  up: Extract<Upstream, { kind: 'url' }>,
  path: string,
  body: Buffer,
  doneKind: 'openai' | 'llama' = 'openai',
): Promise<FastifyReply> {
  const ctrl = new AbortController();
  const raw = reply.raw;
  const onClose = () => {
    if (!raw.writableFinished) ctrl.abort(new Error('client disconnected'));
  };
  raw.once('close', onClose);
  let res: IncomingMessage;
  try {
    res = await upstreamCall(agent, up, 'POST', path, body, ctrl.signal);
  } catch (err) {
    raw.off('close', onClose);
    if (ctrl.signal.aborted) return abandon(reply);
    request.log.warn({ err, path }, 'upstream request failed');
    return reply.code(503).header('retry-after', '5').send(apiError(`the model server is not reachable (${describeNetError(err)}); the mesh may be restarting`, 'server_error', 'upstream_unavailable'));
  }
  const ct = String(res.headers['content-type'] ?? '');
  if (res.statusCode !== 200 || !ct.includes('text/event-stream')) {
    // An error answer (a 400 from llama-server, say) comes as JSON: pass it on whole.
    raw.off('close', onClose);
    try {
      const data = await readAll(res);
      return reply.code(res.statusCode ?? 502).header('content-type', ct || 'application/json').send(data);
    } catch (err) {
      return reply.code(502).send(apiError(`the model server failed mid-answer (${describeNetError(err)})`, 'server_error', 'upstream_failed'));
    }
  }

  reply.hijack();
  raw.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  raw.flushHeaders();
  const done = new DoneDetector(doneKind);
  await new Promise<void>((resolveStream) => {
    let finished = false;
    const finish = (problem: string | null) => {
      if (finished) return;
      finished = true;
      raw.off('close', onClose);
      if (problem !== null && !raw.destroyed) {
        request.log.warn({ path, problem }, 'stream from the model server was cut');
        // A blank line first, in case the cut fell inside an event.
        raw.write(`\n\nevent: error\ndata: ${JSON.stringify(apiError(`the stream was cut: ${problem}`, 'server_error', 'stream_interrupted'))}\n\n`);
      }
      if (!raw.destroyed) raw.end();
      resolveStream();
    };
    res.on('data', (chunk: Buffer) => {
      done.push(chunk);
      if (!raw.destroyed && !raw.write(chunk)) {
        // Backpressure: a slow client slows the upstream read, not our memory.
        res.pause();
        raw.once('drain', () => res.resume());
      }
    });
    res.on('end', () => {
      if (done.seen) finish(null);
      else if (!res.complete) finish('the model server closed the connection mid-answer');
      else finish('the model server ended the stream without [DONE]');
    });
    res.on('error', (err) => finish(ctrl.signal.aborted ? null : `the model server connection failed (${describeNetError(err)})`));
    res.on('aborted', () => finish(ctrl.signal.aborted ? null : 'the model server closed the connection mid-answer'));
    raw.once('close', () => {
      if (!finished) {
        ctrl.abort(new Error('client disconnected'));
        res.destroy();
        finish(null);
      }
    });
  });
  return reply;
}

/**
 * The client is gone: take the reply out of fastify's hands, or fastify keeps waiting for a send that will
 * never come (and `close()` waits for it).
 */
export function abandon(reply: FastifyReply): FastifyReply {
  reply.hijack();
  if (!reply.raw.destroyed) reply.raw.destroy();
  return reply;
}

/**
 * Watches an SSE byte stream for its last event, across chunk boundaries: a `data: [DONE]` line (OpenAI), or
 * a `data: {...}` line with `"stop":true` (llama-server's own /completion).
 */
class DoneDetector {
  seen = false;
  private carry = '';
  constructor(private readonly kind: 'openai' | 'llama' = 'openai') {}
  push(chunk: Buffer): void {
    if (this.seen) return;
    const text = this.carry + chunk.toString('latin1');
    const lines = text.split('\n');
    this.carry = lines.pop() ?? '';
    const keep = this.kind === 'openai' ? 64 : 1 << 20;
    if (this.carry.length > keep) this.carry = this.carry.slice(-keep);
    const last = this.kind === 'openai' ? (l: string) => l.trim() === 'data: [DONE]' : (l: string) => l.startsWith('data: ') && /"stop"\s*:\s*true/.test(l);
    if (lines.some(last)) this.seen = true;
  }
}

function isConnectError(err: unknown): boolean {
  const code = (err as { code?: string }).code;
  return code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EHOSTUNREACH' || code === 'ENOTFOUND' || code === 'EPIPE';
}

export function describeNetError(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e.code ?? String(e.message ?? err).split('\n')[0]!;
}
