// End to end, the trust boundary from outside (issue 10, "nothing before admission"): a real hosting node
// (`mesh-inference` with a model, serving) and a stranger with a fresh iroh key and no mesh secret. The
// stranger opens every stream kind on its own QUIC connection to the node: http (a GET for llama-server),
// rpc (an RPC hello), direct (an offer for a key to the data port, then the data port itself), and control
// with a hello under a wrong secret. It gets nothing: no byte of llama-server, no key, no hello, and the
// node logs why. Before admission was enforced, the http stream answered `HTTP/1.1 200`.
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createIrohEndpoint, createIrohRawEndpoint } from '../src/io/transport/iroh-transport.ts';
import { requestTicket } from '../src/io/transport/direct-offer.ts';
import { dialDirect, newTicket } from '../src/io/transport/direct-path.ts';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { encodeFrame, FrameDecoder } from '../src/io/wire/frame-codec.ts';
import { makeHello } from '../src/io/wire/mesh-auth.ts';
import { createMeshSecret } from '../src/io/wire/invite-token.ts';
import type { MeshEndpoint, RawConnection, RawEndpoint, RawStream } from '../src/io/transport/transport.ts';
import { asEndpointId, type EndpointId } from '../src/machines/mesh-types.ts';
import { hostServing, makeE2eMesh, type E2eMesh, type E2eNode } from './e2e-support.ts';

const GET_PROPS = new TextEncoder().encode('GET /props HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n');

/** Everything the other side sends on `s` within `ms` (until it finishes, resets or the time is up). */
async function collect(s: RawStream, ms: number): Promise<{ bytes: Buffer; end: string }> {
  const parts: Uint8Array[] = [];
  const deadline = Date.now() + ms;
  let end = 'timeout';
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      s.read().then(
        (c) => ({ c }),
        (e: unknown) => ({ e: String(e) }),
      ),
      new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), left))),
    ]);
    clearTimeout(timer);
    if (r === 'timeout') break;
    if ('e' in r) {
      end = r.e;
      break;
    }
    if (r.c === null) {
      end = 'finished';
      break;
    }
    parts.push(r.c);
  }
  return { bytes: Buffer.concat(parts), end };
}

/** Logged JSON lines of the node (stderr), parsed. */
function logs(node: E2eNode): { level: number; msg: string; [k: string]: unknown }[] {
  const out: { level: number; msg: string }[] = [];
  for (const l of node.lines()) {
    try {
      const v = JSON.parse(l) as { level?: unknown; msg?: unknown };
      if (typeof v.level === 'number' && typeof v.msg === 'string') out.push(v as { level: number; msg: string });
    } catch {
      // not a log line
    }
  }
  return out;
}

describe('e2e: a stranger against a hosting node', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let node: E2eNode;
  let nodeId: EndpointId;
  let nodeAddrs: string[];
  let raw: RawEndpoint;
  const conns: RawConnection[] = [];

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    node = await mesh.start({ name: 'host', vram: 2 });
    await node.waitStatus(hostServing, 90_000, 'a serving solo host');
    const invite = decodeInviteToken(node.token);
    nodeId = invite.inviter;
    nodeAddrs = [...invite.addrs];
    raw = await createIrohRawEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1' });
  }, 150_000);

  afterAll(async () => {
    for (const c of conns) c.close(0, 'test over');
    await raw?.close();
    await mesh?.cleanup();
  });

  async function strangerStream(first: Uint8Array): Promise<RawStream> {
    const conn = await raw.dial(nodeId, nodeAddrs, AbortSignal.timeout(10_000));
    conns.push(conn);
    const s = await conn.openBi();
    await s.write(first);
    return s;
  }

  it('http (0x03): no byte of llama-server, and the node logs the refusal', async () => {
    const s = await strangerStream(Uint8Array.of(0x03, 0x00));
    await s.write(GET_PROPS);
    const { bytes, end } = await collect(s, 8_000);
    const text = bytes.toString('latin1');
    // Before admission was enforced: "HTTP/1.1 200 OK" and llama-server's /props.
    expect(text, `the stranger got: ${JSON.stringify(text.slice(0, 200))} (${end})`).not.toMatch(/HTTP\/1\.1/);
    expect(bytes.length).toBe(0);
    expect(end).not.toBe('timeout');
    await waitLog(node, (l) => /not admitted|no valid hello/.test(l.msg));
  });

  it('rpc (0x02): nothing back', async () => {
    const s = await strangerStream(Uint8Array.of(0x02, 0x00));
    // RPC_CMD_HELLO (14) with an empty payload: a bare rpc-server answers its version.
    const hello = new Uint8Array(9);
    hello[0] = 14;
    await s.write(hello);
    const { bytes, end } = await collect(s, 8_000);
    expect(bytes.length).toBe(0);
    expect(end).not.toBe('timeout');
  });

  it('direct (0x05): no key for the data port, so no byte of llama-server through it either', async () => {
    // A full mesh endpoint with admission off on the stranger's side, so that it can speak the offer exchange.
    const stranger: MeshEndpoint = await createIrohEndpoint({
      secretKey: new Uint8Array(randomBytes(32)),
      bindHost: '127.0.0.1',
      admission: 'open',
    } as Parameters<typeof createIrohEndpoint>[0]);
    try {
      const conn = await stranger.dial(nodeId, nodeAddrs, { timeoutMs: 10_000 });
      let got: string;
      try {
        const { ticket, addrs } = await requestTicket(conn, 'http', null, 6_000);
        // Before: the node handed out a key, and the data port let the stranger reach llama-server.
        const tls = await dialDirect(addrs, ticket, 5_000);
        tls.resume();
        tls.write(GET_PROPS);
        got = await new Promise<string>((resolve) => {
          let acc = '';
          tls.on('data', (d: Buffer) => (acc += d.toString('latin1')));
          tls.on('close', () => resolve(`answer: ${acc}`));
          setTimeout(() => {
            tls.destroy();
            resolve(`answer: ${acc}`);
          }, 5_000).unref();
        });
      } catch (err) {
        got = `refused: ${String(err)}`;
      }
      expect(got).not.toMatch(/HTTP\/1\.1/);
      expect(got).toMatch(/^refused/);
      // The data port itself, with a key of the stranger's own making: the TLS-PSK handshake fails.
      const dataPort = (await node.status()).tunnels.dataPort;
      expect(dataPort).not.toBeNull();
      const forged = await dialDirect([`127.0.0.1:${dataPort}`], newTicket(), 3_000).then(
        (t) => {
          t.destroy();
          return 'connected';
        },
        (e: unknown) => `failed: ${String(e)}`,
      );
      expect(forged).toMatch(/^failed/);
    } finally {
      await stranger.close();
    }
  });

  it('control (0x01) with a hello under a wrong secret: refused, and the node tells nothing about itself', async () => {
    const s = await strangerStream(Uint8Array.of(0x01));
    const me = asEndpointId(Buffer.from(raw.id, 'hex').toString('hex'));
    await s.write(encodeFrame(makeHello({ role: 'auto', vramBytes: 1, model: null }, createMeshSecret(), me, nodeId)));
    const { bytes } = await collect(s, 8_000);
    const { messages } = new FrameDecoder({ maxFrameBytes: 1 << 20 }).push(bytes);
    // Only the refusal, which names the reason; never the node's own hello (its role, VRAM, model).
    expect(messages.map((m) => m.type)).toEqual(['leaving']);
    expect(messages[0]).toMatchObject({ type: 'leaving', reason: expect.stringMatching(/refused: wrong mesh secret/) });
    await waitLog(node, (l) => l.level === 40 && l.msg.startsWith('refusing peer: wrong mesh secret'));
  });

  it('many unadmitted connections from one address, each under a fresh key: past the bound they are cut at once', async () => {
    for (const c of conns.splice(0)) c.close(0, 'next test');
    const invite = decodeInviteToken(node.token);
    const raws: RawEndpoint[] = [];
    try {
      const n = 24;
      for (let i = 0; i < n; i++) raws.push(await createIrohRawEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1' }));
      const knocks = await Promise.all(raws.map((r) => r.dial(invite.inviter, [...invite.addrs], AbortSignal.timeout(10_000))));
      const outcome = await Promise.all(knocks.map((c) => Promise.race([c.closed, new Promise<null>((r) => setTimeout(() => r(null), 1_500))])));
      const cut = outcome.filter((o) => o !== null);
      // The default bound is 16 per address: the rest are closed with CLOSE_CODES.busy, at once.
      expect(outcome.filter((o) => o === null).length).toBe(16);
      expect(cut.length).toBe(n - 16);
      for (const o of cut) expect(o).toMatchObject({ code: 4, byPeer: true });
      await waitLog(node, (l) => l.level === 40 && l.msg.startsWith('closing an incoming connection at once'));
      for (const c of knocks) c.close(0, 'test over');
      // The node is fine afterwards: its API answers.
      expect((await node.status()).node.id).toBe(invite.inviter);
    } finally {
      await Promise.all(raws.map((r) => r.close()));
    }
  });
});

async function waitLog(node: E2eNode, pred: (l: { level: number; msg: string }) => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (logs(node).some(pred)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no such log line within ${ms} ms; last lines:\n${node.lines().slice(-15).join('\n')}`);
}
