// Who may use the API: the `Host` check against DNS rebinding (loopback names, the addresses listened on,
// `--allowed-host` names; others get 421) and the `--api-key` bearer key (every route but /health; 401).
import { timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import type { FastifyInstance } from 'fastify';
import { apiError } from './api-request.ts';

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

/**
 * Refuses requests whose `Host` is not in `allowedHosts` (default: loopback names) with 421. DNS rebinding: a
 * web page whose name now resolves to this machine sends its own name as Host.
 */
export function requireAllowedHost(app: FastifyInstance, allowedHosts: ReadonlySet<string> = new Set<string>(LOOPBACK_HOSTS)): void {
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
}

/** Refuses requests without "Authorization: Bearer <apiKey>" with 401, but /health and `open` paths (the console's static files). */
export function requireApiKey(app: FastifyInstance, apiKey: string, open: (url: string) => boolean = () => false): void {
  const expected = Buffer.from(apiKey, 'utf8');
  app.addHook('onRequest', async (request, reply) => {
    if (request.url === '/health' || request.url.startsWith('/health?')) return;
    if (request.method === 'GET' && open(request.url)) return;
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
