// End to end: a real ggml-rpc-server session through the rpc tunnel (worker in its own process, iroh on
// loopback) gives llama-server the same greedy tokens as reaching that rpc-server directly.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { asEndpointId, type EndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/secret-key.ts';
import { TunnelService } from '../src/io/tunnel.ts';
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

    const host = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1' });
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
});
