// Finds this machine's public IPv4 address (and the port its NAT maps to) by asking STUN servers, so that
// an invite token made with `--bind-port` can carry an address reachable from outside the LAN.
import { createRequire } from 'node:module';

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
interface StunModule {
  request(
    url: string,
    options: { timeout: number; maxTimeout: number; retries: number; socket?: import('node:dgram').Socket },
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

function askOne(server: string, budgetMs: number, localPort: number | undefined): Promise<StunResult> {
  const { host, port } = parseStunServer(server);
  return new Promise((resolve, reject) => {
    const options: Parameters<StunModule['request']>[1] = retrySchedule(budgetMs);
    if (localPort !== undefined) {
      // The library closes sockets it made itself; one we pass in is ours to close.
      void import('node:dgram').then((dgram) => {
        const socket = dgram.createSocket('udp4');
        socket.once('error', (err) => reject(new StunError(`${server}: ${err.message}`)));
        socket.bind(localPort, () => {
          stun.request(`${host}:${port}`, { ...options, socket }, (err, res) => {
            socket.close();
            settle(err, res);
          });
        });
      });
    } else {
      stun.request(`${host}:${port}`, options, settle);
    }
    function settle(err: Error | null, res?: StunResponse): void {
      if (err || !res) {
        reject(new StunError(`${server}: ${err?.message ?? 'no response'}`));
        return;
      }
      const a = res.getXorAddress() ?? res.getAddress();
      if (!a) reject(new StunError(`${server}: the answer carried no address`));
      else resolve({ address: a.address, port: a.port, server });
    }
  });
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
  let timer: NodeJS.Timeout | undefined;
  const overall = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new StunError('deadline')), timeoutMs + 250);
  });
  try {
    if (init.localPort !== undefined) {
      const errors: string[] = [];
      for (const s of servers) {
        try {
          return await Promise.race([askOne(s, budget, init.localPort), overall]);
        } catch (err) {
          errors.push((err as Error).message);
        }
      }
      throw new AggregateError(errors.map((m) => new Error(m)));
    }
    return await Promise.race([Promise.any(servers.map((s) => askOne(s, budget, undefined))), overall]);
  } catch (err) {
    const reasons =
      err instanceof AggregateError ? err.errors.map((e: unknown) => (e as Error).message) : [(err as Error).message];
    throw new StunError(
      `no STUN server answered within ${timeoutMs} ms (tried ${servers.join(', ')}): ${reasons.join('; ')}`,
    );
  } finally {
    clearTimeout(timer);
  }
}
