// The node's OpenAI-compatible API (fastify): validates requests, asks a resolver where each one goes (the
// local llama-server on the host, a local http-tunnel port on workers and lite clients), and proxies it,
// streaming SSE chunk by chunk. Built here, listened by the caller.
//
// Failure rules: no route yet -> 503 with Retry-After and the reason; the client goes away -> the upstream
// request is aborted (llama-server stops generating); the upstream dies mid-stream -> the stream ends with
// an SSE `error` event and no `[DONE]` (OpenAI clients throw on it), never a silent truncation or a hang.
//
// Two listeners use it: the node's API (`:9337`, clients, `--api-key`) and, on every node that may host, the
// mesh listener where incoming http tunnels end (loopback only, reached through admitted tunnels, no key:
// admission authenticates mesh traffic; its resolver never forwards, see proxy.machine.ts); the mesh
// listener also serves llama-server's own /completion, /tokenize and /apply-template (`llamaRoutes`).
// Both check `Host` (DNS rebinding): loopback names, the addresses listened on, and `--allowed-host` names.
import { timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { Agent, request as httpRequest, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from '../host/logger.ts';

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

export interface ApiServerInit {
  readonly upstream: UpstreamResolver;
  /** GET /api/status: the mesh view, roles, the plan, each machine's state (any JSON value). */
  readonly status: () => unknown;
  /** Bearer key required on every route but /health; null/undefined = open. */
  readonly apiKey?: string | null;
  readonly logger?: Logger;
  /** Bound on the resolver for model routes; past it: 503 (default 65 s, past the proxy machine's 60 s). */
  readonly resolveTimeoutMs?: number;
  /** Bound on the resolver for /health, which must answer fast (default 2 s). */
  readonly healthResolveTimeoutMs?: number;
  /** Request body limit (default 32 MiB: long prompts, but not unbounded). */
  readonly bodyLimit?: number;
  /**
   * The `Host` names this API answers to besides loopback names (see allowedHostNames); others get 421.
   * Undefined: loopback names only.
   */
  readonly allowedHosts?: ReadonlySet<string>;
  /** Also serve llama-server's /completion, /tokenize and /apply-template (the host's mesh listener). */
  readonly llamaRoutes?: boolean;
}

/** The OpenAI error body. */
export interface ApiErrorBody {
  readonly error: { readonly message: string; readonly type: string; readonly code: string; readonly param?: string | null };
}

export function apiError(message: string, type: string, code: string, param: string | null = null): ApiErrorBody {
  return { error: { message, type, code, param } };
}

class RequestError extends Error {
  constructor(
    readonly statusCode: number,
    readonly body: ApiErrorBody,
  ) {
    super(body.error.message);
  }
}

interface ParsedBody {
  readonly raw: Buffer;
  readonly json: unknown;
}

const MODEL_ROUTES = [
  { path: '/v1/chat/completions', field: 'messages', done: 'openai' },
  { path: '/v1/completions', field: 'prompt', done: 'openai' },
] as const;

/** llama-server's own routes, served on the host's mesh listener (`llamaRoutes`). */
const LLAMA_ROUTES = [
  { path: '/completion', field: 'prompt', done: 'llama' },
  { path: '/tokenize', field: 'content', done: 'llama' },
  { path: '/apply-template', field: 'messages', done: 'llama' },
] as const;

const LOOPBACK_HOSTS = ['localhost', '127.0.0.1', '::1'] as const;

/**
 * The `Host` names an API listening on `listenHost` answers to: loopback names, `listenHost` itself, every
 * address of this machine when it listens on all of them (0.0.0.0 / ::), and `extra` (`--allowed-host`).
 * Lowercase, IPv6 without brackets.
 */
export function allowedHostNames(
  listenHost: string,
  extra: readonly string[] = [],
  interfaces: () => readonly string[] = () => Object.values(networkInterfaces()).flatMap((l) => (l ?? []).map((i) => i.address)),
): Set<string> {
  const out = new Set<string>(LOOPBACK_HOSTS);
  const add = (h: string) => out.add(normalizeHostName(h));
  if (listenHost === '0.0.0.0' || listenHost === '::') for (const a of interfaces()) add(a);
  else add(listenHost);
  for (const h of extra) add(h);
  return out;
}

function normalizeHostName(h: string): string {
  const t = h.trim().toLowerCase().replace(/\.$/, '');
  return t.startsWith('[') && t.endsWith(']') ? t.slice(1, -1) : t;
}

/** The host name of a `Host` header ("name", "name:port", "[v6]", "[v6]:port"); null when malformed. */
export function hostHeaderName(header: string): string | null {
  const h = header.trim();
  if (h === '') return null;
  if (h.startsWith('[')) {
    const m = /^\[([0-9a-fA-F:.]+)\](?::\d{1,5})?$/.exec(h);
    return m === null ? null : m[1]!.toLowerCase();
  }
  const m = /^([^:\s/@]+)(?::\d{1,5})?$/.exec(h);
  return m === null ? null : normalizeHostName(m[1]!);
}

/** Builds the app; the caller listens (`app.listen({ host, port })`) and closes it. */
export function buildApiServer(init: ApiServerInit): FastifyInstance {
  const app = Fastify({
    loggerInstance: init.logger as FastifyBaseLogger | undefined,
    // Per-request lines would drown a node's log; failures are logged where they happen.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: init.bodyLimit ?? 32 * 1024 * 1024,
    // Generations can take minutes: never cut a connection for being slow.
    requestTimeout: 0,
    connectionTimeout: 0,
    // Closing is the node stopping: its llama-server goes too, so waiting for open streams (or for a
    // client's idle keep-alive socket) would only delay the shutdown.
    forceCloseConnections: true,
  });
  // Keep-alive to the upstream: the proxy's added latency per request is a measured figure (bench/).
  const agent = new Agent({ keepAlive: true, maxSockets: 64 });
  app.addHook('onClose', async () => agent.destroy());

  // JSON only; the raw bytes are kept and forwarded as they came (no re-serialisation).
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (_req, body: Buffer, done) => {
    try {
      done(null, { raw: body, json: JSON.parse(body.toString('utf8')) } satisfies ParsedBody);
    } catch (err) {
      done(new RequestError(400, apiError(`the body is not valid JSON: ${(err as Error).message}`, 'invalid_request_error', 'invalid_json')), undefined);
    }
  });

  app.setErrorHandler((err: Error & { statusCode?: number; code?: string }, request, reply) => {
    if (err instanceof RequestError) return reply.code(err.statusCode).send(err.body);
    if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' || err.statusCode === 415) {
      const ct = request.headers['content-type'] ?? 'none';
      return reply.code(400).send(apiError(`content-type must be application/json (got ${ct})`, 'invalid_request_error', 'unsupported_content_type'));
    }
    if (err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY') {
      return reply.code(400).send(apiError('the body is empty; expected a JSON object', 'invalid_request_error', 'invalid_json'));
    }
    if (err.statusCode === 413) {
      return reply.code(413).send(apiError('the request body is too large', 'invalid_request_error', 'body_too_large'));
    }
    if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
      return reply.code(err.statusCode).send(apiError(err.message, 'invalid_request_error', err.code ?? 'bad_request'));
    }
    request.log.error({ err }, 'API request failed');
    return reply.code(500).send(apiError('internal error', 'server_error', 'internal_error'));
  });
  app.setNotFoundHandler((request, reply) =>
    reply.code(404).send(apiError(`no route ${request.method} ${request.url.split('?')[0]}`, 'invalid_request_error', 'not_found')),
  );

  // DNS rebinding: a web page whose name now resolves to this machine sends its own name as Host.
  const allowedHosts = init.allowedHosts ?? new Set<string>(LOOPBACK_HOSTS);
  app.addHook('onRequest', async (request, reply) => {
    const header = request.headers.host;
    if (header === undefined) return; // HTTP/1.0 without Host: no browser sends that
    const name = hostHeaderName(header);
    if (name !== null && allowedHosts.has(name)) return;
    request.log.warn({ host: header.slice(0, 100), url: request.url.slice(0, 100) }, 'refused a request for a Host this node does not answer to');
    const shown = JSON.stringify(header.slice(0, 100));
    return reply
      .code(421)
      .send(
        apiError(
          `this node does not answer to Host ${shown} (DNS rebinding protection): use a loopback address or one it listens on, or start it with --allowed-host ${name !== null && isIP(name) === 0 ? name : 'NAME'}`,
          'invalid_request_error',
          'host_not_allowed',
        ),
      );
  });

  if (init.apiKey) {
    const expected = Buffer.from(init.apiKey, 'utf8');
    app.addHook('onRequest', async (request, reply) => {
      if (request.url === '/health' || request.url.startsWith('/health?')) return;
      const m = /^Bearer\s+(.+)$/i.exec(request.headers.authorization ?? '');
      const given = Buffer.from(m?.[1]?.trim() ?? '', 'utf8');
      if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
        return reply
          .code(401)
          .header('www-authenticate', 'Bearer')
          .send(apiError(m ? 'invalid API key' : 'missing API key: send "Authorization: Bearer <key>"', 'invalid_request_error', 'invalid_api_key'));
      }
    });
  }

  const resolve = async (request: FastifyRequest, reply: FastifyReply, path: string, timeoutMs: number): Promise<Upstream> => {
    const ctrl = new AbortController();
    const onClose = () => ctrl.abort(new Error('client disconnected'));
    reply.raw.once('close', onClose);
    const timer = setTimeout(() => ctrl.abort(new Error('timeout')), timeoutMs);
    try {
      const up = await Promise.race([
        init.upstream({ path, signal: ctrl.signal }),
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
  };

  const unavailable = (reply: FastifyReply, up: Extract<Upstream, { kind: 'unavailable' }>) =>
    reply
      .code(503)
      .header('retry-after', String(Math.max(1, Math.ceil(up.retryAfterS))))
      .send(apiError(up.reason, 'server_error', 'mesh_unavailable'));

  app.get('/health', async (request, reply) => {
    const up = await resolve(request, reply, '/health', init.healthResolveTimeoutMs ?? 2_000);
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
  });

  app.get('/api/status', async () => init.status());

  app.get('/v1/models', async (request, reply) => {
    const up = await resolve(request, reply, '/v1/models', init.resolveTimeoutMs ?? 65_000);
    if (up.kind === 'unavailable') return unavailable(reply, up);
    return proxyBuffered(request, reply, agent, up, 'GET', '/v1/models', null);
  });

  for (const route of [...MODEL_ROUTES, ...(init.llamaRoutes ? LLAMA_ROUTES : [])]) {
    app.post(route.path, async (request, reply) => {
      const body = request.body as ParsedBody | undefined;
      if (body === undefined || body === null) {
        // No content-type at all and no body: fastify leaves the body undefined.
        return reply.code(400).send(apiError('expected a JSON body (content-type: application/json)', 'invalid_request_error', 'invalid_json'));
      }
      const problem = validateModelRequest(body.json, route.field);
      if (problem !== null) return reply.code(400).send(problem);
      const stream = (body.json as { stream?: unknown }).stream === true;
      const up = await resolve(request, reply, route.path, init.resolveTimeoutMs ?? 65_000);
      if (reply.raw.destroyed) return abandon(reply); // the client left while we waited
      if (up.kind === 'unavailable') return unavailable(reply, up);
      return stream
        ? proxyStream(request, reply, agent, up, route.path, body.raw, route.done)
        : proxyBuffered(request, reply, agent, up, 'POST', route.path, body.raw);
    });
  }
  return app;
}

/** An OpenAI-style 400 body when the request lacks what the route needs, else null. */
export function validateModelRequest(json: unknown, field: 'messages' | 'prompt' | 'content'): ApiErrorBody | null {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    return apiError('the body must be a JSON object', 'invalid_request_error', 'invalid_body');
  }
  const o = json as Record<string, unknown>;
  const v = o[field];
  if (v === undefined) return apiError(`missing required field '${field}'`, 'invalid_request_error', 'missing_field', field);
  if (field === 'messages') {
    if (!Array.isArray(v) || v.length === 0) return apiError("'messages' must be a non-empty array", 'invalid_request_error', 'invalid_field', 'messages');
    const bad = v.findIndex((m) => typeof m !== 'object' || m === null || typeof (m as { role?: unknown }).role !== 'string');
    if (bad >= 0) return apiError(`'messages[${bad}]' must be an object with a string 'role'`, 'invalid_request_error', 'invalid_field', `messages[${bad}]`);
  } else if (!(typeof v === 'string' || (Array.isArray(v) && v.length > 0))) {
    return apiError(`'${field}' must be a string or a non-empty array`, 'invalid_request_error', 'invalid_field', field);
  }
  if (o['stream'] !== undefined && typeof o['stream'] !== 'boolean') {
    return apiError("'stream' must be a boolean", 'invalid_request_error', 'invalid_field', 'stream');
  }
  return null;
}

function upstreamCall(
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

async function readAll(res: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  if (!res.complete) throw new Error('the upstream response was cut off');
  return Buffer.concat(chunks);
}

/** Whole-body proxying (non-streaming requests, /v1/models): a cut answer becomes a 502, never half a JSON. */
async function proxyBuffered(
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
async function proxyStream(
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
function abandon(reply: FastifyReply): FastifyReply {
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

function describeNetError(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e.code ?? String(e.message ?? err).split('\n')[0]!;
}
