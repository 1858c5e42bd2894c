// The direct data path on real TLS sockets (loopback): a key handed out through an offer opens exactly one
// connection, for that peer and kind, while the tunnel policy still allows it; nothing else reaches the
// target (it counts every connection it gets).
import { createHmac, randomBytes } from 'node:crypto';
import { connect, createServer, type Socket } from 'node:net';
import { createServer as createTlsServer } from 'node:tls';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import {
  DirectPathServer,
  decodeAnswer,
  decodeOffer,
  dialDirect,
  encodeAnswer,
  encodeOffer,
  newTicket,
  relay,
  type DirectAnswer,
} from '../src/io/transport/direct-path.ts';
import type { TunnelPolicy } from '../src/io/transport/tunnel.ts';
import { countingEcho, tlsAttempt } from './support/direct-support.ts';

const HOST = 'h'.repeat(64) as EndpointId;
const MEMBER = 'm'.repeat(64) as EndpointId;
const log = pino({ level: 'silent' });


const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(policy: (peer: EndpointId, kind: 'rpc' | 'http', planId: string | null) => ReturnType<TunnelPolicy>) {
  const target = await countingEcho();
  cleanups.push(() => new Promise<void>((r) => void target.close().then(r)));
  const allow: TunnelPolicy = (peer, kind, planId) => policy(peer, kind, planId) ?? { host: '127.0.0.1', port: target.port };
  const server = new DirectPathServer({ host: '127.0.0.1', port: 0, ticketTtlMs: 2_000 }, { allow, advertise: () => ['127.0.0.1'], log });
  await server.start();
  cleanups.push(() => server.close());
  return { target, server, addrs: [`127.0.0.1:${server.port}`] };
}

const onlyHostRpc = (peer: EndpointId, kind: string) =>
  peer === HOST && kind === 'rpc' ? (null as never) : { refuse: 'rpc tunnels are accepted only from the host' };

async function echoOnce(socket: Socket, bytes: number): Promise<Buffer> {
  const payload = randomBytes(bytes);
  const got: Buffer[] = [];
  let n = 0;
  socket.resume();
  await new Promise<void>((resolve, reject) => {
    socket.on('data', (b: Buffer) => {
      got.push(b);
      n += b.length;
      if (n >= bytes) resolve();
    });
    socket.once('error', reject);
    socket.write(payload);
  });
  const back = Buffer.concat(got);
  expect(back.equals(payload)).toBe(true);
  return back;
}


describe('direct data path', () => {
  it('offers and answers round-trip their encodings; garbage is a typed error', () => {
    const t = newTicket();
    const back = decodeOffer(encodeOffer('rpc', t));
    expect(back.kind).toBe('rpc');
    expect(back.ticket.id).toBe(t.id);
    expect(back.ticket.key.equals(t.key)).toBe(true);
    const a: DirectAnswer = { addrs: ['10.0.0.1:7000', '[::1]:7000'] };
    const enc = encodeAnswer(a);
    expect(decodeAnswer(enc.subarray(0, enc.length - 1))).toBeNull();
    expect(decodeAnswer(enc)).toEqual(a);
    expect(decodeAnswer(encodeAnswer({ refuse: 'no' }))).toEqual({ refuse: 'no' });
    // Protocol 2: an rpc offer carries the plan id (length u8 | UTF-8) after the 49 bytes; an http offer none.
    const rpc = encodeOffer('rpc', t, 'plan-7');
    expect(rpc.length).toBe(49 + 1 + 6);
    expect(Buffer.from(rpc.subarray(49)).toString('latin1')).toBe('\x06plan-7');
    expect(decodeOffer(rpc)).toMatchObject({ kind: 'rpc', planId: 'plan-7', ticket: { id: t.id } });
    expect(decodeOffer(encodeOffer('rpc', t)).planId).toBeNull();
    expect(encodeOffer('http', t, 'ignored').length).toBe(49);
    expect(decodeOffer(encodeOffer('http', t))).toMatchObject({ kind: 'http', planId: null });
    expect(() => decodeOffer(rpc.subarray(0, rpc.length - 1))).toThrow(/direct offer is 56 bytes, not 55/);
    expect(() => decodeOffer(Uint8Array.of(...rpc, 0))).toThrow(/direct offer/);
    expect(() => decodeOffer(new Uint8Array(10))).toThrow(/direct offer/);
    expect(() => decodeOffer(Uint8Array.of(9, ...new Uint8Array(48)))).toThrow(/unknown tunnel kind/);
    expect(() => decodeAnswer(Uint8Array.of(1, 0, 0xc1))).toThrow(/bad direct answer/);
  });

  it('a ticket from the allowed peer opens one relayed connection to the target, and counts its bytes', async () => {
    const { target, server } = await setup(onlyHostRpc);
    const ticket = newTicket();
    const answer = server.offer(HOST, 'rpc', ticket);
    expect('addrs' in answer).toBe(true);
    const socket = await dialDirect((answer as { addrs: string[] }).addrs, ticket, 2_000);
    cleanups.push(() => void socket.destroy());
    await echoOnce(socket, 16 * 1024);
    expect(target.connections()).toBe(1);
    const [conn] = server.connections();
    expect(conn?.peer).toBe(HOST);
    expect(conn?.counters.bytesIn).toBe(16 * 1024);
    expect(conn?.counters.bytesOut).toBe(16 * 1024);
    // The key was good once.
    await expect(dialDirect((answer as { addrs: string[] }).addrs, ticket, 2_000)).rejects.toThrow(/no direct connection/);
    expect(target.connections()).toBe(1);
  });

  it('refuses, before a byte reaches the target: another peer, another kind, a wrong key, no key, an expired key, a policy that changed', async () => {
    let hostAllowed = true;
    const { target, server, addrs } = await setup((peer, kind) => (hostAllowed ? onlyHostRpc(peer, kind) : { refuse: 'the plan changed' }));
    expect(server.offer(MEMBER, 'rpc', newTicket())).toEqual({ refuse: 'rpc tunnels are accepted only from the host' });
    expect(server.offer(HOST, 'http', newTicket())).toHaveProperty('refuse');

    const port = server.port;
    const good = newTicket();
    server.offer(HOST, 'rpc', good);
    expect(await tlsAttempt(port, good.id, randomBytes(32))).toBe('refused'); // wrong key (and the ticket is spent)
    expect(await tlsAttempt(port, newTicket().id, randomBytes(32))).toBe('refused'); // a stranger's identity
    const spent = newTicket();
    server.offer(HOST, 'rpc', spent, null, Date.now() - 10_000); // expired at once
    expect(await tlsAttempt(port, spent.id, spent.key)).toBe('refused');

    const late = newTicket();
    server.offer(HOST, 'rpc', late);
    hostAllowed = false; // the hand-off happened between the offer and the dial
    expect(await tlsAttempt(port, late.id, late.key)).toBe('refused');
    expect(target.connections()).toBe(0);
    void addrs;
  });

  it('a ticket is bound to the plan it was offered for: the policy decides again at the handshake, for that plan', async () => {
    let served = 'plan-1';
    const { target, server, addrs } = await setup((peer, kind, planId) => (planId === served ? onlyHostRpc(peer, kind) : { refuse: `not plan ${String(planId)}` }));
    expect(server.offer(HOST, 'rpc', newTicket(), 'plan-0')).toEqual({ refuse: 'not plan plan-0' });
    const old = newTicket();
    expect(server.offer(HOST, 'rpc', old, 'plan-1')).toHaveProperty('addrs');
    const fresh = newTicket();
    served = 'plan-2'; // the worker moved on between the offer and the dial (without a hand-off to void keys)
    expect(server.offer(HOST, 'rpc', fresh, 'plan-2')).toHaveProperty('addrs');
    expect(await tlsAttempt(server.port, old.id, old.key)).toBe('refused');
    const socket = await dialDirect(addrs, fresh, 2_000);
    cleanups.push(() => void socket.destroy());
    await echoOnce(socket, 1024);
    expect(target.connections()).toBe(1);
  });

  it('a member holding the mesh secret and claiming the host id: in with secret-derived keys, out with per-connection ones', async () => {
    const meshSecret = randomBytes(32);
    const derived = (a: string, b: string) => createHmac('sha256', meshSecret).update(`${a}|${b}`).digest();
    const WORKER = 'w'.repeat(64);
    // A deliberately weak listener: keys derived from the mesh secret over both ids.
    const target = await countingEcho();
    cleanups.push(() => new Promise<void>((r) => void target.close().then(r)));
    const weak = createTlsServer(
      {
        ciphers: 'TLS_AES_128_GCM_SHA256',
        minVersion: 'TLSv1.3',
        pskCallback: (_s, identity) => (identity === HOST ? derived(HOST, WORKER) : null),
      },
      (s) => {
        s.on('error', () => {});
        s.pipe(s);
      },
    );
    await new Promise<void>((r) => weak.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => weak.close(() => r())));
    const weakPort = (weak.address() as { port: number }).port;
    // The member knows the secret and both ids, so it computes the host's key:
    expect(await tlsAttempt(weakPort, HOST, derived(HOST, WORKER))).toBe('answered');

    // Ours: the host's real ticket went to the worker over the host's own iroh connection; the member never saw it.
    const { server } = await setup(onlyHostRpc);
    server.offer(HOST, 'rpc', newTicket());
    expect(await tlsAttempt(server.port, HOST, derived(HOST, WORKER))).toBe('refused');
    expect(await tlsAttempt(server.port, HOST, meshSecret)).toBe('refused');
  });

  it('the hand-off closes the peer\'s live connections and voids its keys', async () => {
    const { server } = await setup(onlyHostRpc);
    const ticket = newTicket();
    const answer = server.offer(HOST, 'rpc', ticket) as { addrs: string[] };
    const socket = await dialDirect(answer.addrs, ticket, 2_000);
    await echoOnce(socket, 100);
    const unused = newTicket();
    server.offer(HOST, 'rpc', unused);
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    expect(server.closeFrom(HOST)).toBe(1);
    await closed;
    expect(await tlsAttempt(server.port, unused.id, unused.key)).toBe('refused');
  });

  it('bounds the keys a peer may hold', async () => {
    const { server } = await setup(() => null as never);
    const answers = Array.from({ length: 20 }, () => server.offer(HOST, 'rpc', newTicket()));
    expect(answers.filter((a) => 'addrs' in a)).toHaveLength(16);
    expect(answers.at(-1)).toEqual({ refuse: 'too many direct offers in flight' });
  });

  it('relay passes bytes both ways and ends both sides when one side resets', async () => {
    let upstream: Socket | null = null;
    const target = createServer((s) => {
      upstream = s;
      s.on('error', () => {});
      s.pipe(s);
    });
    await new Promise<void>((r) => target.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => target.close(() => r())));
    const counters = { bytesIn: 0, bytesOut: 0 };
    let ended = '';
    const front = createServer((local) => {
      const remote = connect({ host: '127.0.0.1', port: (target.address() as { port: number }).port });
      remote.once('connect', () => relay(local, remote, counters, (why) => (ended = why)));
    });
    await new Promise<void>((r) => front.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => front.close(() => r())));
    const client = connect({ host: '127.0.0.1', port: (front.address() as { port: number }).port });
    await new Promise<void>((r) => client.once('connect', () => r()));
    await echoOnce(client, 64 * 1024);
    expect(counters).toEqual({ bytesIn: 64 * 1024, bytesOut: 64 * 1024 });
    const closed = new Promise<void>((r) => client.once('close', () => r()));
    client.on('error', () => {});
    (upstream as Socket | null)?.destroy();
    await closed;
    expect(ended).not.toBe('');
  });
});
