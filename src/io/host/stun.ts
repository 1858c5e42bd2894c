// Finds this machine's public IPv4 address (and the port its NAT maps to) by asking STUN servers, so that
// an invite token made with `--bind-port` can carry an address reachable from outside the LAN.
import { createSocket } from 'node:dgram';
import { lookup } from 'node:dns/promises';
import { createRequire } from 'node:module';
import { isIPv4 } from 'node:net';

/** Public servers asked by default, all at once; the first answer wins. */
export const DEFAULT_STUN_SERVERS: readonly string[] = [
  'stun.l.google.com:19302',
  'stun1.l.google.com:19302',
  'stun.cloudflare.com:3478',
];

export class StunError extends Error {
  override name = 'StunError';
}

export interface StunResult {
  /** The public address as the server saw it. */
  readonly address: string;
  /** The public port of the socket that asked (meaningful when `localPort` was given). */
  readonly port: number;
  /** Which server answered. */
  readonly server: string;
}

export interface StunInit {
  /** `host:port` entries (`--stun`); default DEFAULT_STUN_SERVERS. */
  readonly servers?: readonly string[];
  /** The longest the whole discovery may take. Default 3 s. */
  readonly timeoutMs?: number;
  /** Ask from this local UDP port (so the mapped port belongs to it); default: an ephemeral port. */
  readonly localPort?: number;
}

// `stun` ships CommonJS without types; this is the part of it we use.
interface StunAddress {
  readonly address: string;
  readonly port: number;
  readonly family?: string;
}
interface StunResponse {
  getXorAddress(): StunAddress | undefined;
  getAddress(): StunAddress | undefined;
}
interface StunServerHandle {
  on(event: 'error', f: (err: Error) => void): void;
  emit(event: 'error', err: Error): boolean;
  close(): void;
}
interface StunModule {
  createServer(options: { type: 'udp4'; socket: import('node:dgram').Socket }): StunServerHandle;
  request(
    url: string,
    options: { timeout: number; maxTimeout: number; retries: number; server?: StunServerHandle },
    cb: (err: Error | null, res?: StunResponse) => void,
  ): void;
}
const stun = createRequire(import.meta.url)('stun') as StunModule;

/** `host` or `host:port` (default port 3478); IPv4 or a name. Throws StunError naming what is wrong. */
export function parseStunServer(s: string): { host: string; port: number } {
  const t = s.trim().replace(/^stun:\/\//, '');
  if (t.startsWith('[') || (t.match(/:/g)?.length ?? 0) > 1) {
    throw new StunError(`STUN server "${s}": IPv6 is not supported, give an IPv4 address or a host name`);
  }
  const [host, portText] = t.split(':');
  if (!host || !/^[A-Za-z0-9.-]+$/.test(host)) throw new StunError(`STUN server "${s}": expected host:port`);
  const port = portText === undefined ? 3478 : Number(portText);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new StunError(`STUN server "${s}": port must be 1-65535`);
  }
  return { host, port };
}

/**
 * Retransmission settings that let the library give up on its own before `budgetMs` (it keeps its own
 * timers and socket, which we cannot cancel from outside): RTO doubling from `first`, capped.
 */
export function retrySchedule(budgetMs: number): { timeout: number; maxTimeout: number; retries: number } {
  const timeout = Math.max(50, Math.min(500, Math.floor(budgetMs / 6)));
  const maxTimeout = Math.max(timeout, Math.floor(budgetMs / 3));
  let total = 0;
  let retries = 0;
  // attempt k waits min(timeout << k, maxTimeout); the final wait is the one after the last retry.
  for (;;) {
    const wait = Math.min(timeout * 2 ** retries, maxTimeout);
    if (total + wait > budgetMs) break;
    total += wait;
    retries++;
  }
  return { timeout, maxTimeout, retries: Math.max(0, retries - 1) };
}

/**
 * One server, within `budgetMs`. The host name is resolved first, bounded by the budget (an unresolvable
 * name costs at most its own budget, and the library never sees a name it would resolve on every retry);
 * then the library asks from our socket (bound to `localPort`, or an ephemeral one). Every path (DNS failure,
 * socket error, no answer, the caller's abort) closes the socket before the promise settles, so a bound
 * port is free again for the next try and for QUIC.
 */
async function askOne(server: string, budgetMs: number, localPort: number | undefined, signal: AbortSignal): Promise<StunResult> {
  const { host, port } = parseStunServer(server);
  const started = Date.now();
  const ip = isIPv4(host) ? host : await resolveBounded(server, host, budgetMs, signal);
  const left = Math.max(50, budgetMs - (Date.now() - started));
  const socket = createSocket('udp4');
  let closed: Promise<void> | null = null;
  const close = (): Promise<void> =>
    (closed ??= new Promise<void>((r) => {
      try {
        socket.close(() => r());
      } catch {
        r(); // already closed
      }
    }));
  // An error listener for the socket's whole life: a late error (a retransmission after the answer) must
  // never become an uncaught 'error' event.
  let failed: ((err: Error) => void) | null = null;
  socket.on('error', (err) => failed?.(err));
  // Our server object: an 'error' on it is the only way to end the library's retransmission timer.
  const server_ = stun.createServer({ type: 'udp4', socket });
  server_.on('error', () => {}); // a malformed packet outside a request is no crash
  let requesting = false;
  try {
    return await new Promise<StunResult>((resolve, reject) => {
      const fail = (err: Error | StunError) => reject(err instanceof StunError ? err : new StunError(`${server}: ${err.message}`));
      failed = fail;
      if (signal.aborted) return fail(new StunError(`${server}: gave up`));
      signal.addEventListener('abort', () => fail(new StunError(`${server}: gave up`)), { once: true });
      socket.bind(localPort ?? 0, () => {
        try {
          requesting = true;
          stun.request(`${ip}:${port}`, { ...retrySchedule(left), server: server_ }, (err, res) => {
            requesting = false;
            if (err || !res) return fail(new StunError(`${server}: ${err?.message ?? 'no response'}`));
            const a = res.getXorAddress() ?? res.getAddress();
            if (!a) fail(new StunError(`${server}: the answer carried no address`));
            else resolve({ address: a.address, port: a.port, server });
          });
        } catch (err) {
          fail(err as Error);
        }
      });
    });
  } finally {
    failed = null;
    if (requesting) server_.emit('error', new Error('gave up')); // stops the retransmissions
    server_.close();
    await close();
  }
}

/** dns.lookup, bounded: a name that does not resolve (or a resolver that does not answer) is a StunError. */
async function resolveBounded(server: string, host: string, budgetMs: number, signal: AbortSignal): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([
      lookup(host, { family: 4 }).then(
        (r) => r.address,
        (err: NodeJS.ErrnoException) => {
          throw new StunError(`${server}: cannot resolve ${host} (${err.code ?? err.message})`);
        },
      ),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new StunError(`${server}: resolving ${host} took over ${budgetMs} ms`)), budgetMs);
        onAbort = () => reject(new StunError(`${server}: gave up`));
        signal.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
  } finally {
    clearTimeout(timer);
    if (onAbort) signal.removeEventListener('abort', onAbort);
  }
}

/**
 * Asks every server at once and returns the first answer. When none answers within the bound, the error
 * says which servers were tried and what each said, in one line.
 */
export async function discoverPublicAddress(init: StunInit = {}): Promise<StunResult> {
  const servers = init.servers && init.servers.length > 0 ? init.servers : DEFAULT_STUN_SERVERS;
  const timeoutMs = init.timeoutMs ?? 3_000;
  for (const s of servers) parseStunServer(s);
  // A bound local port can serve one request at a time: then servers are asked in turn.
  const budget = init.localPort !== undefined ? Math.floor(timeoutMs / servers.length) : timeoutMs;
  // On the deadline every ask in flight is aborted, and we wait for their sockets to close: a bound port
  // must be free when this returns, since QUIC binds it next.
  const abort = new AbortController();
  const asks: Promise<unknown>[] = [];
  const ask = (s: string): Promise<StunResult> => {
    const p = askOne(s, budget, init.localPort, abort.signal);
    asks.push(p.catch(() => {}));
    return p;
  };
  let timer: NodeJS.Timeout | undefined;
  const overall = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new StunError('deadline')), timeoutMs + 250);
  });
  overall.catch(() => {});
  try {
    if (init.localPort !== undefined) {
      const errors: string[] = [];
      for (const s of servers) {
        try {
          return await Promise.race([ask(s), overall]);
        } catch (err) {
          errors.push((err as Error).message);
          if ((err as Error).message === 'deadline') break;
        }
      }
      throw new AggregateError(errors.map((m) => new Error(m)));
    }
    return await Promise.race([Promise.any(servers.map((s) => ask(s))), overall]);
  } catch (err) {
    const reasons =
      err instanceof AggregateError ? err.errors.map((e: unknown) => (e as Error).message) : [(err as Error).message];
    throw new StunError(
      `no STUN server answered within ${timeoutMs} ms (tried ${servers.join(', ')}): ${reasons.join('; ')}`,
    );
  } finally {
    clearTimeout(timer);
    abort.abort();
    await Promise.all(asks);
  }
}
