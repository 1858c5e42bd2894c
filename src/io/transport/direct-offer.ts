// The `direct` stream: how two admitted peers agree a key for one direct data connection. The tunnel's
// opener sends an offer (tunnel kind + a fresh ticket) on its iroh connection to the peer; the peer's
// DirectPathServer checks its tunnel policy, keeps the ticket, and answers where to dial. One round trip on
// the control plane per TCP connection; every wait is bounded.
import type { TLSSocket } from 'node:tls';
import type { TunnelKind } from '../../machines/tunnel-policy.ts';
import {
  DirectPathError,
  decodeAnswer,
  decodeOffer,
  dialDirect,
  encodeAnswer,
  encodeOffer,
  newTicket,
  offerLength,
  type DirectAnswer,
  type DirectPathServer,
  type DirectTicket,
} from './direct-path.ts';
import { TUNNEL_REFUSED } from './tunnel-codec.ts';
import { firstLine, type MeshConnection, type MeshStream } from './transport.ts';

/**
 * Opener: asks `conn`'s peer for a direct connection of `kind` (rpc: for plan `planId`, the plan our
 * llama-server runs) and dials it. Resolves with the TLS socket (paused) or rejects with a one-line reason
 * (refused, no answer in time, nothing reachable): the caller then falls back to an iroh stream.
 */
export async function openDirect(conn: MeshConnection, kind: TunnelKind, planId: string | null, timeoutMs: number): Promise<TLSSocket> {
  const deadline = Date.now() + timeoutMs;
  const { ticket, addrs } = await requestTicket(conn, kind, planId, timeoutMs);
  return await dialDirect(addrs, ticket, Math.max(1, deadline - Date.now()));
}

/**
 * Opener: agrees a ticket for one direct connection of `kind` with `conn`'s peer, without dialing: the
 * connection is then made by whoever gets the ticket (llama-server itself, with patch 0003). rpc: the ticket
 * is bound to `planId`. Rejects with a one-line reason.
 */
export async function requestTicket(
  conn: MeshConnection,
  kind: TunnelKind,
  planId: string | null,
  timeoutMs: number,
): Promise<{ ticket: DirectTicket; addrs: readonly string[] }> {
  const ticket = newTicket();
  let stream: MeshStream | undefined;
  try {
    const answer = await bounded(
      (async () => {
        stream = await conn.openStream('direct');
        await stream.write(encodeOffer(kind, ticket, planId));
        return await readAnswer(stream);
      })(),
      timeoutMs,
      'no answer to the direct offer',
    );
    void stream?.finish().catch(() => {});
    if ('refuse' in answer) throw new DirectPathError(`the peer said no: ${answer.refuse}`);
    return { ticket, addrs: answer.addrs };
  } catch (err) {
    stream?.reset(TUNNEL_REFUSED);
    throw err instanceof DirectPathError ? err : new DirectPathError(firstLine(err));
  }
}

/**
 * Acceptor: answers one offer on a `direct` stream from `conn`'s (admitted) peer. Without a data port
 * (`--data-path quic`, or none could listen) every offer is refused, and the opener uses QUIC.
 */
export async function answerDirect(stream: MeshStream, conn: MeshConnection, server: DirectPathServer | null, timeoutMs: number): Promise<DirectAnswer> {
  let answer: DirectAnswer;
  try {
    const offer = await bounded(readOffer(stream), timeoutMs, 'the offer did not arrive in time');
    const { kind, ticket, planId } = decodeOffer(offer);
    answer = server === null ? { refuse: 'this node uses QUIC only (--data-path quic)' } : server.offer(conn.remoteId, kind, ticket, planId);
  } catch (err) {
    stream.reset(TUNNEL_REFUSED);
    return { refuse: firstLine(err) };
  }
  try {
    await stream.write(encodeAnswer(answer));
    await stream.finish();
  } catch {
    stream.reset(TUNNEL_REFUSED);
  }
  return answer;
}

async function readAnswer(stream: MeshStream): Promise<DirectAnswer> {
  let buf: Uint8Array = new Uint8Array(0);
  for (;;) {
    const chunk = await stream.read();
    if (chunk === null) throw new DirectPathError('the peer closed the direct stream without an answer');
    buf = concat(buf, chunk);
    if (buf.length > 4096) throw new DirectPathError('a direct answer over 4 KiB');
    const answer = decodeAnswer(buf);
    if (answer !== null) return answer;
  }
}

/** One whole offer: its length is known from its kind byte and, for rpc, its plan id's length byte. */
async function readOffer(stream: MeshStream): Promise<Uint8Array> {
  let buf: Uint8Array = new Uint8Array(0);
  while (buf.length < offerLength(buf)) {
    const chunk = await stream.read();
    if (chunk === null) throw new DirectPathError(`the direct offer ended after ${buf.length} of ${offerLength(buf)} bytes`);
    buf = concat(buf, chunk);
  }
  if (buf.length > offerLength(buf)) throw new DirectPathError('bytes after a direct offer');
  return buf;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new DirectPathError(`${what} (${ms} ms)`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
