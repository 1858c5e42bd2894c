// The node's ggml-rpc-server, for real: started on a free loopback port and ready only after a HELLO
// answer; it survives a queued client that hangs up (SIGPIPE ignored; the same scenario kills an
// unprotected one); a busy server makes the probe time out; failures and exits are reported.
import { createServer, connect, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { findLlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { spawnManaged, stopAll, SpawnError } from '../src/io/llama/processes.ts';
import { startRpcServer, RpcServerStartError, freeLoopbackPort, rpcDeviceCount, type RpcServerProcess } from '../src/io/llama/rpc-server-process.ts';
import { rpcHello } from '../src/io/llama/rpc-traffic.ts';
import { llamaBinaries, makeTempModel } from './helpers/llama.ts';

const sockets: Socket[] = [];
const servers: Server[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const s of servers.splice(0)) s.close();
  await stopAll(2000);
});

/** A client that completes HELLO and then holds the rpc-server (it serves one client at a time). */
async function holdServer(address: string): Promise<Socket> {
  const [host, port] = address.split(':');
  const sock = connect({ host: host!, port: Number(port) });
  sockets.push(sock);
  await new Promise<void>((resolve, reject) => {
    sock.once('error', reject);
    sock.once('connect', () => {
      const req = Buffer.alloc(9 + 24);
      req[0] = 14;
      req.writeBigUInt64LE(24n, 1);
      sock.write(req);
    });
    let got = 0;
    sock.on('data', (d: Buffer) => {
      got += d.length;
      if (got >= 8 + 28) resolve();
    });
  });
  return sock;
}

/** A queued client: connects while the server is busy, sends HELLO, hangs up before it is served. */
async function queuedClientThatHangsUp(address: string): Promise<void> {
  const [host, port] = address.split(':');
  const sock = connect({ host: host!, port: Number(port) });
  await new Promise<void>((resolve) => sock.once('connect', () => resolve()));
  const req = Buffer.alloc(9 + 24);
  req[0] = 14;
  req.writeBigUInt64LE(24n, 1);
  sock.write(req);
  await new Promise((r) => setTimeout(r, 100));
  sock.destroy();
}

describe('startRpcServer', () => {
  it('starts on a free loopback port and answers HELLO (protocol 6)', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    expect(rpc.address).toBe(`127.0.0.1:${rpc.port}`);
    expect(rpc.version.major).toBe(6);
    expect(await rpc.probe(2000)).toEqual(rpc.version);
    const exit = await rpc.stop();
    expect(exit.requested).toBe(true);
  });

  it('two servers get two ports', async () => {
    const bins = llamaBinaries();
    const [a, b] = await Promise.all([startRpcServer({ binary: bins.rpcServer, threads: 1 }), startRpcServer({ binary: bins.rpcServer, threads: 1 })]);
    expect(a.port).not.toBe(b.port);
  });

  it('survives a queued client that hangs up (SIGPIPE ignored); an unprotected server dies of it', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    await checkSurvival(rpc.address, () => rpc.process.exitInfo());
    expect(rpc.process.exitInfo()).toBeNull();
    expect((await rpc.probe(3000)).major).toBe(6);

    // The control: the same binary and scenario without the protection.
    const port = await freeLoopbackPort();
    const bare = spawnManaged({ name: 'bare-rpc', file: bins.rpcServer, args: ['-H', '127.0.0.1', '-p', String(port), '-t', '1'], ignoreSigpipe: false });
    await waitHello(`127.0.0.1:${port}`);
    await checkSurvival(`127.0.0.1:${port}`, () => bare.exitInfo());
    const exit = await Promise.race([bare.exited, new Promise((r) => setTimeout(() => r('still running'), 5000))]);
    expect(exit).toMatchObject({ signal: 'SIGPIPE' });
  });

  it('a busy server makes the HELLO probe time out (one client at a time)', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    const holder = await holdServer(rpc.address);
    await expect(rpc.probe(500)).rejects.toThrow(/did not answer HELLO within 500 ms/);
    holder.destroy();
    expect((await rpc.probe(3000)).major).toBe(6);
  });

  it('reports how many devices it exposes (HELLO + DEVICE_COUNT), and a busy one times out', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    expect(await rpcDeviceCount(rpc.address)).toBe(1);
    expect(await rpcDeviceCount(rpc.address)).toBe(1);
    const holder = await holdServer(rpc.address);
    await expect(rpcDeviceCount(rpc.address, 400)).rejects.toThrow(/did not answer DEVICE_COUNT within 400 ms/);
    holder.destroy();
    await expect(rpcDeviceCount(`127.0.0.1:${await freeLoopbackPort()}`)).rejects.toThrow(/ECONNREFUSED/);
  });

  it('reports an exit, with the signal', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    process.kill(rpc.process.pid, 'SIGKILL');
    expect(await rpc.exited).toMatchObject({ signal: 'SIGKILL', requested: false });
  });

  it('a taken port is a clear error (the binary itself exits 0 there)', async () => {
    const bins = llamaBinaries();
    const squatter = createServer();
    servers.push(squatter);
    await new Promise<void>((r) => squatter.listen(0, '127.0.0.1', () => r()));
    const port = (squatter.address() as { port: number }).port;
    const err = await startRpcServer({ binary: bins.rpcServer, threads: 1, port }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RpcServerStartError);
    expect((err as Error).message).toMatch(/^ggml-rpc-server exited \(status 0\) before it answered HELLO: .*Failed to create server socket/);
  });

  it('bad arguments and missing binaries are clear errors', async () => {
    const bins = llamaBinaries();
    await expect(startRpcServer({ binary: '/nonexistent/ggml-rpc-server' })).rejects.toThrow(SpawnError);
    await expect(startRpcServer({ binary: bins.rpcServer, devices: ['NOPE0'] })).rejects.toThrow(/exited \(status 1\) before it answered HELLO: .*unknown device: NOPE0/);
  });

  it('an abort during the start kills it', async () => {
    const bins = llamaBinaries();
    const ctrl = new AbortController();
    const p = startRpcServer({ binary: bins.rpcServer, threads: 1, signal: ctrl.signal });
    ctrl.abort(new Error('node stopping'));
    await expect(p).rejects.toThrow('node stopping');
  });

  it('with our patch: serves the node\'s own GGUF (--gguf)', async () => {
    const mesh = await findLlamaBinaries({ variant: 'mesh' });
    expect(mesh.setTensorGguf).toBe(true);
    const model = await makeTempModel();
    try {
      const rpc = await startRpcServer({ binary: mesh.rpcServer, threads: 1, gguf: model.path, ggufSupported: mesh.setTensorGguf });
      expect(rpc.servesGguf).toBe(true);
      // Its stdout is block-buffered in a pipe: wait for the line rather than expect it at once.
      await waitLine(rpc.process, (l) => l.includes(model.path));
      // Told that the binary lacks the patch (a stock one would refuse the flag), it leaves --gguf out.
      const plain = await startRpcServer({ binary: mesh.rpcServer, threads: 1, gguf: model.path, ggufSupported: false });
      expect(plain.servesGguf).toBe(false);
      expect(plain.process.tail().join('\n')).not.toContain(model.path);
      await plain.stop();
      expect(plain.process.exitInfo()!.tail.join('\n')).not.toContain(model.path);
    } finally {
      await model.remove();
    }
  });
});

/** Hold the server, queue a client that hangs up, then release: the server writes HELLO's answer to it. */
async function checkSurvival(address: string, exitInfo: () => unknown): Promise<void> {
  const holder = await holdServer(address);
  await queuedClientThatHangsUp(address);
  holder.destroy();
  // Give the server time to accept the dead client and write to it.
  await new Promise((r) => setTimeout(r, 500));
  void exitInfo;
}

async function waitLine(proc: RpcServerProcess['process'], match: (line: string) => boolean): Promise<void> {
  if (proc.tail().some(match)) return;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no such line; output:\n${proc.tail().join('\n')}`)), 10_000);
    const off = proc.onLine((l) => {
      if (match(l)) {
        clearTimeout(timer);
        off();
        resolve();
      }
    });
  });
}

async function waitHello(address: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await rpcHello(address, 1000);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`no HELLO from ${address}`);
}


describe('the rpc-server machine with the real actor logic', () => {
  it('start -> ready, a crash is reported, a restart gets a fresh server, stop leaves nothing behind', async () => {
    const { createActor, fromCallback } = await import('xstate');
    const { rpcServerMachine } = await import('../src/machines/rpc-server.machine.ts');
    const { rpcServerProcessLogic, waitRpcServerListeningLogic } = await import('../src/actors/rpc-server.actor.ts');
    const bins = llamaBinaries();
    const notices: { type: string; port?: number; reason?: string }[] = [];
    const owner = createActor(fromCallback(({ receive }) => receive((e) => void notices.push(e as never)))).start();
    const started: RpcServerProcess[] = [];
    const machine = rpcServerMachine.provide({
      actors: {
        rpcServerProcess: rpcServerProcessLogic({ binary: bins.rpcServer, threads: 1, killGraceMs: 1000, onStarted: (s) => started.push(s) }),
        waitRpcServerListening: waitRpcServerListeningLogic,
      },
    });
    const actor = createActor(machine, { input: { notify: owner } }).start();
    const next = async (type: string) => {
      const deadline = Date.now() + 30_000;
      while (Date.now() < deadline) {
        const i = notices.findIndex((n) => n.type === type);
        if (i >= 0) return notices.splice(0, i + 1).at(-1)!;
        await new Promise((r) => setTimeout(r, 20));
      }
      throw new Error(`no ${type}; got ${JSON.stringify(notices)}`);
    };

    actor.send({ type: 'rpc.start' });
    const ready = await next('rpc.ready');
    expect(ready.port).toBe(started[0]!.port);
    expect((await rpcHello(`127.0.0.1:${ready.port}`, 2000)).major).toBe(6);

    process.kill(started[0]!.process.pid, 'SIGKILL');
    expect((await next('rpc.crashed')).reason).toMatch(/^rpc-server exited: killed by SIGKILL/);
    expect(actor.getSnapshot().value).toEqual({ crashed: 'idle' });

    actor.send({ type: 'rpc.start' });
    const again = await next('rpc.ready');
    expect(started).toHaveLength(2);
    expect(again.port).toBe(started[1]!.port);

    actor.send({ type: 'rpc.stop' });
    await next('rpc.stopped');
    expect(started[1]!.process.exitInfo()).toMatchObject({ requested: true });

    // Stopping the whole actor while a server runs: the slot's cleanup kills it.
    actor.send({ type: 'rpc.start' });
    await next('rpc.ready');
    actor.stop();
    expect(await started[2]!.exited).toMatchObject({ requested: true });
    owner.stop();
  });
});
