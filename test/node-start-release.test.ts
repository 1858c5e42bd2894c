// A node's start acquires step by step on one disposal stack: whichever step fails, what the steps before it
// acquired is released, and nothing is left: no handle, no child process, and the fixed UDP bind port can
// be bound again by a plain socket. Each failure is injected through the node's components (or, for the
// API, by a port that is really taken). A lite client (no model) runs no processes, so no binaries are needed.
import { createSocket } from 'node:dgram';
import { createServer, type Server } from 'node:net';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { pino } from 'pino';
import { fromCallback } from 'xstate';
import { afterEach, describe, expect, it } from 'vitest';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { discoverPublicAddress } from '../src/io/host/stun.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { buildNode, runningChildren, type NodeComponents, type NodeConfig } from '../src/node.ts';

const logger = pino({ level: 'silent' });

// iroh's binding lets go of a closed endpoint's UDP socket when the endpoint object is collected, so the test
// collects garbage before it binds the port again: only an endpoint still referenced (or never closed) fails.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** A UDP port that is free right now. */
async function freeUdpPort(): Promise<number> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
  const port = s.address().port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Whether a plain UDP socket can bind `port` (the endpoint, and STUN's socket, let it go). */
async function udpPortFree(port: number): Promise<boolean> {
  for (let i = 0; i < 20; i++) {
    gc();
    if (await tryBind(port)) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

async function tryBind(port: number): Promise<boolean> {
  const s = createSocket('udp4');
  const ok = await new Promise<boolean>((resolve) => {
    s.once('error', () => resolve(false));
    s.bind(port, '127.0.0.1', () => resolve(true));
  });
  // A socket whose bind failed is still a handle until closed.
  await new Promise<void>((r) => s.close(() => r()));
  return ok;
}

async function tcpPortFree(port: number): Promise<boolean> {
  const s = createServer();
  const ok = await new Promise<boolean>((resolve) => {
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => resolve(true));
  });
  if (ok) await new Promise<void>((r) => s.close(() => r()));
  return ok;
}

const activeHandles = (): number => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length;

/** Handles close on the next turns of the loop (sockets' close callbacks): wait until back at `baseline`. */
async function settledHandles(baseline: number): Promise<number> {
  for (let i = 0; i < 40 && activeHandles() > baseline; i++) await new Promise((r) => setTimeout(r, 50));
  return activeHandles();
}

function config(bindPort: number, apiPort = 0): NodeConfig {
  return {
    name: 'release-test',
    role: 'auto',
    joins: [],
    bindHost: '127.0.0.1',
    bindPort,
    // The data port takes the bind port's number, in TCP: a step of its own.
    dataPort: null,
    dataPath: 'auto',
    // A server that does not answer: STUN really binds the port, then gives up.
    stun: ['127.0.0.1:9'],
    relay: { kind: 'none' },
    apiHost: '127.0.0.1',
    port: apiPort,
    apiKey: null,
    countRpc: false,
  };
}

function components(overrides: Partial<NodeComponents['net']> & { inspector?: NodeComponents['inspector'] } = {}): NodeComponents {
  const { inspector, ...net } = overrides;
  return {
    logger,
    holdings: { secretKey: ephemeralSecretKey(), model: null, vram: null },
    net: { stun: (init) => discoverPublicAddress({ ...init, timeoutMs: 300 }), bind: createIrohEndpoint, ...net },
    processes: () => ({}),
    inspector,
  };
}

describe('a node releases what its start acquired, whichever step fails', () => {
  let blocker: Server | null = null;
  afterEach(async () => {
    await new Promise<void>((r) => (blocker ? blocker.close(() => r()) : r()));
    blocker = null;
  });

  async function expectNothingLeft(bindPort: number, baseline: number): Promise<void> {
    expect(await udpPortFree(bindPort), `UDP port ${bindPort} bound again`).toBe(true);
    expect(await tcpPortFree(bindPort), `TCP port ${bindPort} (the data port) bound again`).toBe(true);
    expect(runningChildren()).toBe(0);
    expect(await settledHandles(baseline), 'active handles back to the baseline').toBeLessThanOrEqual(baseline);
  }

  it('a full start and stop (with STUN failing, which is no failure): nothing left', async () => {
    const baseline = activeHandles();
    const bindPort = await freeUdpPort();
    const node = buildNode(config(bindPort), components());
    const status = await node.start().then((started) => started.actor.getSnapshot().status);
    expect(status).toBe('active');
    expect(await tryBind(bindPort)).toBe(false); // the endpoint holds it
    await node.stop('test');
    await node.stopped;
    await expectNothingLeft(bindPort, baseline);
  }, 30_000);

  const failures: { step: string; components: () => NodeComponents; apiPortTaken?: boolean; dataPortTaken?: boolean; error: RegExp }[] = [
    {
      step: 'STUN (throws instead of answering)',
      components: () => components({ stun: async () => Promise.reject(new Error('injected: STUN failed')) }),
      error: /^$/, // not a failure: the start goes on without a public address
    },
    {
      step: 'the endpoint bind',
      components: () => components({ bind: async () => Promise.reject(new Error('injected: bind failed')) }),
      error: /injected: bind failed/,
    },
    {
      step: 'the node parts, after the bind (an inspector that throws)',
      components: () =>
        components({
          inspector: () => ({
            inspect: {
              next: () => {
                throw new Error('injected: inspector failed');
              },
            },
            stop: () => {},
          }),
        }),
      error: /injected: inspector failed/,
    },
    { step: 'the data port (its TCP port taken)', components: () => components(), dataPortTaken: true, error: /data port \d+ \(TCP\) is already in use/ },
    { step: 'the API listen (port taken)', components: () => components(), apiPortTaken: true, error: /is already in use/ },
    {
      step: 'the actor start (its network fails at once)',
      components: () =>
        components({
          network: () =>
            fromCallback(() => {
              throw new Error('injected: network failed');
            }) as never,
        }),
      error: /injected: network failed/,
    },
  ];

  for (const f of failures) {
    it(`${f.step}: nothing left`, async () => {
      const baseline = activeHandles();
      let apiPort = 0;
      if (f.apiPortTaken) {
        const server = createServer();
        blocker = server;
        await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
        apiPort = (server.address() as { port: number }).port;
      }
      const bindPort = await freeUdpPort();
      if (f.dataPortTaken) {
        const server = createServer();
        blocker = server;
        await new Promise<void>((r) => server.listen(bindPort, '127.0.0.1', () => r()));
      }
      const node = buildNode(config(bindPort, apiPort), f.components());
      const outcome = await node.start().then(
        async () => {
          await node.stop('test');
          return '';
        },
        (err: Error) => err.message,
      );
      expect(outcome).toMatch(f.error);
      await node.stopped;
      if (blocker) await new Promise<void>((r) => blocker!.close(() => r()));
      blocker = null;
      await expectNothingLeft(bindPort, baseline);
    }, 30_000);
  }
});
