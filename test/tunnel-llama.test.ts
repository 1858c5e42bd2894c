// End to end: a real ggml-rpc-server session through the rpc tunnel (worker in its own process, iroh on
// loopback) gives llama-server the same greedy tokens as reaching that rpc-server directly.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { asEndpointId, type EndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { TunnelService } from '../src/io/transport/tunnel.ts';
import {
  greedyCompletion,
  makeTempModel,
  startLlamaServer,
  startRpcServer,
  type RpcServerHandle,
  type TempModel,
} from './helpers/llama.ts';

const children = new Set<ChildProcess>();
const stops: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const s of stops.splice(0).reverse()) await s().catch(() => {});
  for (const c of children) c.kill('SIGKILL');
});

/** test/tunnel-worker.child.ts: a worker's endpoint whose rpc tunnels from `hostId` go to `targetPort`. */
export async function spawnTunnelWorker(hostId: string, targetPort: number): Promise<{ id: EndpointId; addrs: string[]; child: ChildProcess }> {
  const script = fileURLToPath(new URL('./tunnel-worker.child.ts', import.meta.url));
  const child = spawn(process.execPath, ['--import', 'tsx', script, hostId, String(targetPort)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.add(child);
  child.on('exit', () => children.delete(child));
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout! }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`tunnel worker exited (${code}) before it was ready`)));
  });
  const { id, addrs } = JSON.parse(line) as { id: string; addrs: string[] };
  return { id: asEndpointId(id), addrs, child };
}

describe('rpc tunnel with real llama.cpp', () => {
  it('llama-server through the tunnel gives the same greedy tokens as direct', async () => {
    const model: TempModel = await makeTempModel();
    stops.push(() => model.remove());
    // The worker's rpc-server (reached directly, then through the tunnel) and the host's own, always last.
    const workerRpc: RpcServerHandle = await startRpcServer();
    stops.push(() => workerRpc.stop());
    const hostRpc: RpcServerHandle = await startRpcServer();
    stops.push(() => hostRpc.stop());
    const prompt = 'The mesh carries every token';
    const nPredict = 24;

    const direct = await startLlamaServer({ model: model.path, rpc: [workerRpc.address, hostRpc.address], tensorSplit: [1, 1] });
    let directTokens: readonly number[];
    try {
      directTokens = (await greedyCompletion(direct, prompt, nPredict)).tokens;
    } finally {
      await direct.stop();
    }
    expect(directTokens.length).toBe(nPredict);

    const host = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
    stops.push(() => host.close());
    const worker = await spawnTunnelWorker(host.id, workerRpc.port);
    await host.dial(worker.id, worker.addrs);
    // Both codecs: the host opens tunnels, so no handlers (start()) are needed on its side.
    for (const codec of ['deflate', 'raw'] as const) {
      const hostTunnels = new TunnelService({ allow: () => ({ refuse: 'host' }), codec }, { endpoint: host });
      stops.push(() => hostTunnels.close());
      const listener = await hostTunnels.listen(worker.id, 'rpc');
      const tunneled = await startLlamaServer({
        model: model.path,
        rpc: [`127.0.0.1:${listener.port}`, hostRpc.address],
        tensorSplit: [1, 1],
      });
      let viaTunnel: readonly number[];
      try {
        viaTunnel = (await greedyCompletion(tunneled, prompt, nPredict)).tokens;
        // A second request on the same session: the tunnel carries a long-lived RPC conversation.
        const again = (await greedyCompletion(tunneled, prompt, nPredict)).tokens;
        expect(again).toEqual(viaTunnel);
      } finally {
        await tunneled.stop();
      }
      expect(viaTunnel, `${codec} codec`).toEqual(directTokens);
      // llama-server gone: its tunnel sockets closed, so the pipes end.
      const deadline = Date.now() + 10_000;
      while (hostTunnels.stats().pipes > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(hostTunnels.stats().pipes).toBe(0);
    }
  }, 240_000);

  it('hand-off: closeFrom(old host) frees the worker rpc-server for the new host at once', async () => {
    const model: TempModel = await makeTempModel();
    stops.push(() => model.remove());
    const workerRpc = await startRpcServer();
    stops.push(() => workerRpc.stop());
    const ownA = await startRpcServer();
    stops.push(() => ownA.stop());
    const ownB = await startRpcServer();
    stops.push(() => ownB.stop());
    const mk = () => createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
    const worker = await mk();
    const hostA = await mk();
    const hostB = await mk();
    stops.push(() => worker.close(), () => hostA.close(), () => hostB.close());
    // The worker's plan names its host; the policy follows it.
    let planHost: EndpointId = hostA.id;
    const workerTunnels = new TunnelService(
      { allow: (id, kind) => (kind === 'rpc' && id === planHost ? { host: '127.0.0.1', port: workerRpc.port } : { refuse: 'not the host of our plan' }) },
      { endpoint: worker },
    );
    workerTunnels.start();
    stops.push(() => workerTunnels.close());
    const route = async (host: typeof hostA) => {
      await host.dial(worker.id, worker.addrs());
      const t = new TunnelService({ allow: () => ({ refuse: 'host' }) }, { endpoint: host });
      stops.push(() => t.close());
      return t.listen(worker.id, 'rpc');
    };
    const viaA = await route(hostA);
    const viaB = await route(hostB);

    const serverA = await startLlamaServer({ model: model.path, rpc: [`127.0.0.1:${viaA.port}`, ownA.address], tensorSplit: [1, 1] });
    stops.push(() => serverA.stop());
    const tokensA = (await greedyCompletion(serverA, 'hand over', 16)).tokens;
    expect(tokensA).toHaveLength(16);

    // The plan changes: B hosts now. A's llama-server still holds its rpc session (idle, connected).
    planHost = hostB.id;
    expect(await workerTunnels.closeFrom(hostA.id)).toBeGreaterThan(0);
    const serverB = await startLlamaServer({
      model: model.path,
      rpc: [`127.0.0.1:${viaB.port}`, ownB.address],
      tensorSplit: [1, 1],
      // Without the hand-off the rpc-server would still serve A, and B would hang here.
      readyTimeoutMs: 60_000,
    });
    stops.push(() => serverB.stop());
    const tokensB = (await greedyCompletion(serverB, 'hand over', 16)).tokens;
    expect(tokensB).toEqual(tokensA);
    // A's new tunnels are refused now.
    const before = workerTunnels.stats().pipes;
    const { createConnection } = await import('node:net');
    const probe = createConnection({ host: '127.0.0.1', port: viaA.port });
    probe.on('error', () => {});
    await new Promise((r) => probe.once('close', r));
    expect(workerTunnels.stats().pipes).toBe(before);
  }, 240_000);
});
