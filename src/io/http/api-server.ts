// The node's OpenAI-compatible API (fastify), assembled: request validation (api-request.ts), the Host check
// and key (api-access.ts), and routes that ask a resolver where each request goes (the local llama-server on
// the host, a local http-tunnel port on workers and lite clients) and proxy it (api-proxy.ts). Built here,
// listened by the caller.
//
// Two listeners use it: the node's API (`:9337`, clients, `--api-key`) and, on every node that may host, the
// mesh listener where incoming http tunnels end (loopback only, reached through admitted tunnels, no key:
// admission authenticates mesh traffic; its resolver never forwards, see proxy.machine.ts); the mesh
// listener also serves llama-server's own /completion, /tokenize and /apply-template (`llamaRoutes`).
// Both check `Host` (DNS rebinding): loopback names, the addresses listened on, and `--allowed-host` names.
import { Agent } from 'node:http';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from '../host/logger.ts';
import { requireAllowedHost, requireApiKey } from './api-access.ts';
import { installAdminRoutes, type AdminActions } from './api-admin.ts';
import { abandon, proxyBuffered, proxyHealth, proxyStream, replyUnavailable, resolveUpstream, type UpstreamResolver } from './api-proxy.ts';
import { apiError, installRequestValidation, LLAMA_ROUTES, MODEL_ROUTES, validateModelRequest, type ParsedBody } from './api-request.ts';
import { serveSurvivable, type SurvivalInit } from './survival.ts';
import { installConsoleRoutes, isConsoleAssetPath, type ConsoleRoutesInit } from './console-routes.ts';
import { survivalPlan } from '../../machines/continuation.ts';

export interface ApiServerInit {
  readonly upstream: UpstreamResolver;
  /** GET /api/status: the mesh view, roles, the plan, each machine's state (any JSON value). */
  readonly status: () => unknown;
  /** GET /api/plan: which node would get which layers and why others are left out (src/machines/plan-explain.ts); absent: no route. */
  readonly plan?: () => unknown;
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
  /** The owner's admin route (POST /api/mesh/rotate, signed by the node's key file); absent: none. */
  readonly admin?: AdminActions;
  /**
   * This API owns the plain chat and completion requests it receives and continues them across changes of
   * plan (src/io/http/survival.ts); absent: every request is proxied as it is (the mesh listener).
   */
  readonly survival?: Pick<SurvivalInit, 'budgetMs' | 'onRequest'>;
  /** GET /api/events and the console at `/` (src/io/http/console-routes.ts); absent: neither (the mesh listener). */
  readonly console?: ConsoleRoutesInit;
  /** Told +1 when a model request starts and -1 when its answer ends (a planned change drains them). */
  readonly onInFlight?: (delta: 1 | -1) => void;
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

  installRequestValidation(app);
  requireAllowedHost(app, init.allowedHosts);
  if (init.apiKey) requireApiKey(app, init.apiKey, init.console !== undefined ? isConsoleAssetPath : undefined);

  const resolve = (request: FastifyRequest, reply: FastifyReply, path: string, timeoutMs: number) =>
    resolveUpstream(init.upstream, request, reply, path, timeoutMs);

  app.get('/health', async (request, reply) => {
    const up = await resolve(request, reply, '/health', init.healthResolveTimeoutMs ?? 2_000);
    return proxyHealth(reply, agent, up);
  });

  app.get('/api/status', async () => init.status());
  if (init.plan !== undefined) app.get('/api/plan', async () => init.plan!());
  if (init.console !== undefined) installConsoleRoutes(app, init.console);
  if (init.admin !== undefined) installAdminRoutes(app, init.admin);

  app.get('/v1/models', async (request, reply) => {
    const up = await resolve(request, reply, '/v1/models', init.resolveTimeoutMs ?? 65_000);
    if (up.kind === 'unavailable') return replyUnavailable(reply, up);
    return proxyBuffered(request, reply, agent, up, 'GET', '/v1/models', null);
  });

  for (const route of [...MODEL_ROUTES, ...(init.llamaRoutes ? LLAMA_ROUTES : [])]) {
    app.post(route.path, async (request, reply) => {
      if (init.onInFlight !== undefined) {
        const onInFlight = init.onInFlight;
        onInFlight(1);
        reply.raw.once('close', () => onInFlight(-1));
      }
      const body = request.body as ParsedBody | undefined;
      if (body === undefined || body === null) {
        // No content-type at all and no body: fastify leaves the body undefined.
        return reply.code(400).send(apiError('expected a JSON body (content-type: application/json)', 'invalid_request_error', 'invalid_json'));
      }
      const problem = validateModelRequest(body.json, route.field);
      if (problem !== null) return reply.code(400).send(problem);
      const stream = (body.json as { stream?: unknown }).stream === true;
      const survivable = init.survival !== undefined && route.field !== 'content' && route.path.startsWith('/v1/') ? survivalPlan(route.field === 'messages' ? 'chat' : 'completion', body.json) : null;
      if (survivable !== null && !('unsurvivable' in survivable)) {
        return serveSurvivable(request, reply, survivable, { ...init.survival, agent, resolve: (signal) => init.upstream({ path: route.path, signal }) });
      }
      if (survivable !== null) request.log.debug({ why: survivable.unsurvivable }, 'proxied as it is (it cannot be continued after a cut)');
      const up = await resolve(request, reply, route.path, init.resolveTimeoutMs ?? 65_000);
      if (reply.raw.destroyed) return abandon(reply); // the client left while we waited
      if (up.kind === 'unavailable') return replyUnavailable(reply, up);
      return stream
        ? proxyStream(request, reply, agent, up, route.path, body.raw, route.done)
        : proxyBuffered(request, reply, agent, up, 'POST', route.path, body.raw);
    });
  }
  return app;
}
