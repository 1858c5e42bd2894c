// End to end, the direct data path (real CLI nodes on loopback, real llama.cpp): a 2-node and a 3-node mesh
// carry their rpc traffic over TCP + TLS (the QUIC tunnels carry none) and give a solo llama-server's greedy
// tokens; `--data-path quic` carries it over QUIC and opens no data port; a worker whose data port cannot be
// reached falls back to QUIC, and the next llama-server start goes direct again; a wrong key, no key, and a
// member that holds the mesh secret and claims the host's id get nothing from a worker's data port.
import { createHmac, randomBytes } from 'node:crypto';
import { createServer, connect as tcpConnect, type Server, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeInviteToken } from '../src/io/wire/invite-token.ts';
import { findLlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import type { NodeStatus } from '../src/node.ts';
import { tlsAttempt } from './support/direct-support.ts';
import { e2eBinDir, greedyTokens, hostServesPlan, llamaChildren, makeE2eMesh, servesPlan, soloReferenceTokens, type E2eMesh, type E2eNode } from './e2e-support.ts';

const PROMPT = 'Across the mesh the hidden states travel, and every token';
const N_TOKENS = 32;
/** An RPC HELLO (cmd 14, empty payload): what a client would send a worker's rpc-server first. */
const RPC_HELLO = Buffer.from([14, 0, 0, 0, 0, 0, 0, 0, 0]);

type Conn = NodeStatus['tunnels']['connections'][number];
const rpcConns = (s: NodeStatus, side: Conn['side']) => s.tunnels.connections.filter((c) => c.kind === 'rpc' && c.side === side);

/** A TCP relay the test opens and closes: where a worker tells peers to dial its data port. */
async function relayTo(listenPort: number, targetPort: number): Promise<{ server: Server; bytes: () => number; close(): Promise<void> }> {
  let bytes = 0;
  const sockets = new Set<Socket>();
  const server = createServer((a) => {
    const b = tcpConnect({ host: '127.0.0.1', port: targetPort });
    for (const s of [a, b]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => sockets.delete(s));
    }
    a.on('data', (d: Buffer) => (bytes += d.length));
    a.pipe(b).pipe(a);
  });
  await new Promise<void>((r) => server.listen(listenPort, '127.0.0.1', r));
  return {
    server,
    bytes: () => bytes,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise<void>((r) => server.close(() => r()));
    },
  };
}

async function freeTcpPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}


describe('e2e: the direct data path', { timeout: 300_000 }, () => {
  let mesh: E2eMesh;
  let reference: number[];
  let nativeTls: boolean;

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    reference = await soloReferenceTokens(mesh.model, PROMPT, N_TOKENS);
    nativeTls = (await findLlamaBinaries({ env: { ...process.env, MESH_LLAMA_BIN_DIR: e2eBinDir() } })).rpcTlsPsk;
  }, 120_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  async function pair(names: [string, string], extra: { host?: string[]; worker?: string[]; workerEnv?: Record<string, string> } = {}): Promise<[E2eNode, E2eNode]> {
    const host = await mesh.start({ name: names[0], vram: 0.7, extraArgs: extra.host });
    const worker = await mesh.start({ name: names[1], vram: 0.6, join: host.token, extraArgs: extra.worker, env: extra.workerEnv });
    await host.waitStatus(hostServesPlan([worker.id, host.id]), 120_000, 'the 2-stage plan served');
    await worker.waitStatus(servesPlan([worker.id, host.id]), 30_000, 'the worker serving');
    return [host, worker];
  }

  it('2 nodes: rpc and http tunnels go direct, QUIC tunnels carry nothing, the tokens are solo\'s; strangers and a secret-holding member get nothing from the data port', async () => {
    // The e2e nodes count RPC traffic on the host (a Node proxy that must see it), so llama-server uses the
    // host's Node relay here; the 3-node case below runs without it.
    const [host, worker] = await pair(['dp-host', 'dp-worker']);
    expect((await greedyTokens(host, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    expect((await greedyTokens(worker, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    const hs = await host.status();
    const ws = await worker.status();
    expect(hs.tunnels.dataPath).toBe('auto');
    expect(hs.tunnels.dataPort).toBeGreaterThan(0);
    expect(rpcConns(hs, 'opened')).toEqual([expect.objectContaining({ peer: worker.id, path: 'direct' })]);
    expect(rpcConns(hs, 'opened')[0]!.bytesIn).toBeGreaterThan(0);
    expect(rpcConns(ws, 'accepted')).toEqual([expect.objectContaining({ peer: host.id, path: 'direct' })]);
    // Nothing crossed a QUIC tunnel, either way, on either node (the worker's API request went direct too).
    for (const s of [hs, ws]) expect({ quicBytesOut: s.tunnels.quicBytesOut, tcpBytesIn: s.tunnels.tcpBytesIn }).toEqual({ quicBytesOut: 0, tcpBytesIn: 0 });
    expect(ws.tunnels.directOpened).toBeGreaterThanOrEqual(1); // the worker's http tunnel to the host's API
    expect(hs.rpcTraffic[worker.id]?.totals.count ?? 0).toBeGreaterThan(0);

    // The attacks, at the worker's data port.
    const port = ws.tunnels.dataPort!;
    const before = rpcConns(ws, 'accepted').length;
    const secret = decodeInviteToken(host.token).secret;
    const secretKey = createHmac('sha256', Buffer.from(secret)).update(`${host.id}|${worker.id}`).digest();
    expect(await tlsAttempt(port, randomBytes(16).toString('hex'), randomBytes(32), RPC_HELLO)).toBe('refused'); // a stranger
    expect(await tlsAttempt(port, host.id, secretKey, RPC_HELLO)).toBe('refused'); // a member with the secret, posing as the host
    expect(await tlsAttempt(port, host.id, Buffer.from(secret), RPC_HELLO)).toBe('refused');
    const plain = await new Promise<string>((resolve) => {
      const s = tcpConnect({ host: '127.0.0.1', port }, () => s.write('GET / HTTP/1.1\r\n\r\n'));
      s.on('data', () => resolve('answered'));
      s.on('error', () => resolve('refused'));
      s.on('close', () => resolve('refused'));
    });
    expect(plain).toBe('refused'); // no TLS at all
    expect(rpcConns(await worker.status(), 'accepted')).toHaveLength(before);
    expect(worker.lines().some((l) => l.includes('refused a data connection'))).toBe(true);
    // The mesh still serves.
    expect((await greedyTokens(host, PROMPT, 8)).tokens).toEqual(reference.slice(0, 8));
    await Promise.all([host.stop(), worker.stop()]);
  });

  it('3 nodes without the counting proxy: every remote stage direct (llama-server speaks TLS itself where patch 0003 is built), solo\'s tokens', async () => {
    const noCount = { MESH_INFERENCE_COUNT_RPC: '0' };
    const host = await mesh.start({ name: 'dp3-host', vram: 0.45, env: noCount });
    const w1 = await mesh.start({ name: 'dp3-w1', vram: 0.4, join: host.token, env: noCount });
    const w2 = await mesh.start({ name: 'dp3-w2', vram: 0.35, join: host.token, env: noCount });
    await host.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.stages.length === 3 && hostServesPlan(s.plan.stages.map((x) => x.id))(s), 150_000, 'the 3-stage plan served');
    expect((await greedyTokens(w2, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    const hs = await host.status();
    for (const w of [w1, w2]) {
      const ws = await w.status();
      expect(rpcConns(ws, 'accepted')).toEqual([expect.objectContaining({ peer: host.id, path: 'direct' })]);
      expect(rpcConns(ws, 'accepted')[0]!.bytesOut).toBeGreaterThan(0);
      expect(ws.tunnels.quicBytesOut).toBe(0);
    }
    expect(hs.tunnels.quicBytesOut).toBe(0);
    if (nativeTls) {
      // llama-server dials the workers' data ports itself: the host relays no rpc bytes.
      expect(rpcConns(hs, 'opened')).toEqual([]);
      expect(hs.tunnels.llamaDialsDirect.map((d) => d.peer).sort()).toEqual([w1.id, w2.id].sort());
      expect(host.lines().some((l) => l.includes('dials these workers over TLS itself'))).toBe(true);
    } else {
      expect(rpcConns(hs, 'opened').map((c) => c.path)).toEqual(['direct', 'direct']);
    }
    await Promise.all([host.stop(), w1.stop(), w2.stop()]);
  });

  it('--data-path quic: no data port, every tunnel on QUIC, solo\'s tokens', async () => {
    const [host, worker] = await pair(['q-host', 'q-worker'], { host: ['--data-path', 'quic'], worker: ['--data-path', 'quic'] });
    expect((await greedyTokens(worker, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    const hs = await host.status();
    const ws = await worker.status();
    expect([hs.tunnels.dataPort, ws.tunnels.dataPort]).toEqual([null, null]);
    expect(rpcConns(hs, 'opened')).toEqual([expect.objectContaining({ peer: worker.id, path: 'quic' })]);
    expect(hs.tunnels.quicBytesOut).toBeGreaterThan(0);
    expect(hs.tunnels.directOpened + ws.tunnels.directOpened).toBe(0);
    await Promise.all([host.stop(), worker.stop()]);
  });

  it('a worker whose data port cannot be reached: QUIC serves; once it can be, the next llama-server start goes direct', async () => {
    const dataPort = await freeTcpPort();
    const relayPort = await freeTcpPort();
    // The worker tells peers to dial a relay that is not there yet.
    const [host, worker] = await pair(['fb-host', 'fb-worker'], {
      worker: ['--data-port', String(dataPort)],
      workerEnv: { MESH_INFERENCE_DATA_ADVERTISE: `127.0.0.1:${relayPort}` },
    });
    expect((await greedyTokens(host, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    let hs = await host.status();
    expect(rpcConns(hs, 'opened').map((c) => c.path)).toEqual(['quic']);
    expect(hs.tunnels.directFallbacks).toBeGreaterThan(0);

    const relay = await relayTo(relayPort, dataPort);
    try {
      const llama = llamaChildren(host).find((p) => p.name === 'llama-server')!;
      process.kill(llama.pid, 'SIGKILL');
      await host.waitStatus((s) => hostServesPlan([worker.id, host.id])(s) && s.processes.llamaServer.generation > hs.processes.llamaServer.generation, 120_000, 'llama-server started again');
      expect((await greedyTokens(host, PROMPT, N_TOKENS)).tokens).toEqual(reference);
      hs = await host.status();
      expect(rpcConns(hs, 'opened').map((c) => c.path)).toEqual(['direct']);
      expect(relay.bytes()).toBeGreaterThan(0);
    } finally {
      await relay.close();
      await Promise.all([host.stop(), worker.stop()]);
    }
  });
});
