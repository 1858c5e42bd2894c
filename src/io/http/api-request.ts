// What a request to the API must be: JSON bodies only (kept raw, forwarded as they came), the fields each
// model route needs, and every refusal or failure answered as an OpenAI error body.
import type { FastifyInstance } from 'fastify';

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

/** A JSON body as the parser leaves it: the bytes as they came, and what they parse to. */
export interface ParsedBody {
  readonly raw: Buffer;
  readonly json: unknown;
}

/** The OpenAI routes that take a JSON body and go to the model. */
export const MODEL_ROUTES = [
  { path: '/v1/chat/completions', field: 'messages', done: 'openai' },
  { path: '/v1/completions', field: 'prompt', done: 'openai' },
] as const;

/** llama-server's own routes, served on the host's mesh listener (`llamaRoutes`). */
export const LLAMA_ROUTES = [
  { path: '/completion', field: 'prompt', done: 'llama' },
  { path: '/tokenize', field: 'content', done: 'llama' },
  { path: '/apply-template', field: 'messages', done: 'llama' },
] as const;

/**
 * JSON only, parsed once and kept raw; fastify's own refusals (media type, empty body, too large) and any
 * other failure answered as OpenAI error bodies; unknown routes 404.
 */
export function installRequestValidation(app: FastifyInstance): void {
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
