// Counts llama.cpp RPC traffic: a loopback TCP proxy in front of a ggml-rpc-server that forwards every
// byte as it arrives and, on the side, parses the protocol (rpc-protocol.ts) to count commands, bytes and
// blocking round trips; and HELLO, the probe that tells a live rpc-server from a port that merely accepts.
import { createServer, connect, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { helloRequest, RPC_COMMANDS, RpcStreamParser, RpcTrafficCounter, type RpcCommandInfo, type RpcTrafficSnapshot } from './rpc-protocol.ts';

export {
  diffRpcSnapshots,
  formatRpcSnapshot,
  RPC_COMMANDS,
  RpcStreamParser,
  RpcTrafficCounter,
  type RpcCommandInfo,
  type RpcCommandStats,
  type RpcTrafficSnapshot,
} from './rpc-protocol.ts';

export interface RpcTrafficProxyOptions {
  /** The rpc-server to forward to: "host:port" or its parts. */
  readonly target: string | { readonly host: string; readonly port: number };
  /** Port to listen on, on 127.0.0.1; default 0 (ephemeral). */
  readonly listenPort?: number;
  /** Extra or replacement commands, for patched servers (a new command and whether it is answered). */
  readonly extraCommands?: Readonly<Record<number, RpcCommandInfo>>;
}

export interface RpcTrafficProxy {
  /** "127.0.0.1:PORT": what to pass to `llama-server --rpc`. */
  readonly address: string;
  readonly port: number;
  snapshot(): RpcTrafficSnapshot;
  /** Zeroes the counts (connections stay up). */
  reset(): void;
  /** Stops listening and closes every forwarded connection. */
  close(): Promise<void>;
}

export class RpcTrafficProxyError extends Error {
  override readonly name = 'RpcTrafficProxyError';
}

function parseTarget(t: RpcTrafficProxyOptions['target']): { host: string; port: number } {
  if (typeof t !== 'string') return t;
  const m = /^(.+):(\d{1,5})$/.exec(t);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new RpcTrafficProxyError(`target must be "host:port", got "${t}"`);
  return { host: m[1]!, port };
}

/** Pipes `from` into `to` with backpressure, handing every chunk to `observe` after it is written. */
function pipeObserved(from: Socket, to: Socket, observe: (chunk: Buffer) => void): void {
  from.on('data', (chunk: Buffer) => {
    // Forward first: counting must never delay a byte.
    if (!to.write(chunk)) {
      from.pause();
      to.once('drain', () => from.resume());
    }
    observe(chunk);
  });
}

/** Starts a counting proxy on 127.0.0.1 in front of the rpc-server at `target`. */
export async function startRpcTrafficProxy(opts: RpcTrafficProxyOptions): Promise<RpcTrafficProxy> {
  const target = parseTarget(opts.target);
  const commands = { ...RPC_COMMANDS, ...opts.extraCommands };
  const counter = new RpcTrafficCounter();
  const sockets = new Set<Socket>();

  const server: Server = createServer({ noDelay: true }, (client) => {
    counter.connectionOpened();
    const parser = new RpcStreamParser(counter, commands);
    const upstream = connect({ host: target.host, port: target.port, noDelay: true });
    sockets.add(client);
    sockets.add(upstream);
    client.setNoDelay(true);
    pipeObserved(client, upstream, (c) => parser.fromClient(c, performance.now()));
    pipeObserved(upstream, client, (c) => parser.fromServer(c, performance.now()));
    // Either side closing or failing ends the pair, as a direct connection would end.
    const end = (side: string) => (err?: Error) => {
      if (err) counter.note(`${side} connection error: ${err.message}`);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end('client'));
    upstream.on('error', end('rpc-server'));
    client.on('close', () => {
      sockets.delete(client);
      upstream.end();
    });
    upstream.on('close', () => {
      sockets.delete(upstream);
      client.end();
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.listenPort ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address();
  if (addr === null || typeof addr === 'string') throw new RpcTrafficProxyError('proxy has no TCP address');

  return {
    address: `127.0.0.1:${addr.port}`,
    port: addr.port,
    snapshot: () => counter.snapshot(),
    reset: () => counter.reset(),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

export interface RpcServerVersion {
  readonly major: number;
  readonly minor: number;
  readonly patch: number;
  /** The reply's fourth byte: padding (0) in stock servers; our patches announce capabilities there. */
  readonly flags: number;
}

/**
 * Sends HELLO to an rpc-server and waits for its version: a real health probe (a TCP connect alone
 * succeeds even when the server is busy with another client or is something else entirely).
 * Rejects with RpcTrafficProxyError on timeout, a closed connection or a malformed answer.
 */
export function rpcHello(address: string, timeoutMs = 2_000): Promise<RpcServerVersion> {
  const { host, port } = parseTarget(address);
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port, noDelay: true });
    let got = Buffer.alloc(0);
    const done = (err: Error | null, v?: RpcServerVersion) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(v!);
    };
    const timer = setTimeout(
      () => done(new RpcTrafficProxyError(`rpc-server at ${address} did not answer HELLO within ${timeoutMs} ms`)),
      timeoutMs,
    );
    sock.on('error', (e) => done(new RpcTrafficProxyError(`rpc-server at ${address}: ${e.message}`)));
    sock.on('close', () => done(new RpcTrafficProxyError(`rpc-server at ${address} closed the connection before answering HELLO`)));
    sock.on('connect', () => {
      sock.write(helloRequest());
    });
    sock.on('data', (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length < 8) return;
      const size = Number(got.readBigUInt64LE(0));
      if (size < 4 || size > 4096) {
        done(new RpcTrafficProxyError(`rpc-server at ${address} answered HELLO with a ${size}-byte reply: not an RPC server?`));
        return;
      }
      if (got.length < 8 + size) return;
      done(null, { major: got[8]!, minor: got[9]!, patch: got[10]!, flags: got[11]! });
    });
  });
}
