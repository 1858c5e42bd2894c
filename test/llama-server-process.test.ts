// The host's llama-server, for real: the command line it gets, load progress and readiness, greedy output
// through two rpc-servers equal to one, and every failure reported with its status and log tail:
// an unreachable or busy rpc-server at start, a bad model, a taken port, an rpc-server dying under it.
import { createServer, connect, type Server, type Socket } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { detectLlamaServerFlags, llamaServerArgs, llamaServerEnv } from '../src/io/llama/llama-server-args.ts';
import { LlamaServerError, parseProgressLine, type LlamaLoadProgress } from '../src/io/llama/llama-server-output.ts';
import {
  checkHealth,
  launchLlamaServer,
  llamaServerKeyFor,
  startLlamaServer,
  type LlamaServerProcess,
} from '../src/io/llama/llama-server-process.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { freeLoopbackPort, rpcDeviceCount, startRpcServer } from '../src/io/llama/rpc-server-process.ts';
import { greedyCompletion, llamaBinaries, makeTempModel, type TempModel } from './helpers/llama.ts';

const FLAGS = { loadMode: true, fit: true, cacheRam: true };
const base = { binary: '/x/llama-server', model: '/m.gguf' };

describe('llamaServerArgs', () => {
  it('puts the stages in --rpc order, names one RPC device per server, offloads every layer', () => {
    const args = llamaServerArgs({ ...base, rpc: ['127.0.0.1:4001', '127.0.0.1:4002'], tensorSplit: [0.67, 0.33] }, 5555, FLAGS);
    const opt = (f: string) => args[args.indexOf(f) + 1];
    expect(opt('--rpc')).toBe('127.0.0.1:4001,127.0.0.1:4002');
    expect(opt('-dev')).toBe('RPC0,RPC1');
    expect(opt('--tensor-split')).toBe('0.67,0.33');
    expect(opt('-ngl')).toBe('999');
    expect(opt('--host')).toBe('127.0.0.1');
    expect(opt('--port')).toBe('5555');
    expect(opt('-lm')).toBe('none');
    expect(opt('--cache-ram')).toBe('0');
    expect(opt('-fit')).toBe('off');
    expect(opt('-fa')).toBe('off');
    expect(opt('-c')).toBe('4096');
    expect(args).toContain('--metrics');
    expect(args).not.toContain('--no-mmap');
  });

  it('divides a stage share among its devices, and falls back to --no-mmap on old releases', () => {
    const args = llamaServerArgs({ ...base, rpc: ['127.0.0.1:1', '127.0.0.1:2'], tensorSplit: [2, 1], devicesPerServer: [2, 1] }, 1, { loadMode: false, fit: false, cacheRam: false });
    expect(args[args.indexOf('-dev') + 1]).toBe('RPC0,RPC1,RPC2');
    expect(args[args.indexOf('--tensor-split') + 1]).toBe('1,1,1');
    expect(args).toContain('--no-mmap');
    expect(args).not.toContain('-lm');
    expect(args).not.toContain('-fit');
    expect(args).not.toContain('--cache-ram');
  });

  it('refuses inconsistent input', () => {
    expect(() => llamaServerArgs({ ...base, rpc: [] }, 1, FLAGS)).toThrow(/at least one rpc-server/);
    expect(() => llamaServerArgs({ ...base, rpc: ['127.0.0.1:1'], tensorSplit: [1, 2] }, 1, FLAGS)).toThrow(/one non-negative share per rpc-server/);
    expect(() => llamaServerArgs({ ...base, rpc: ['127.0.0.1:1'], tensorSplit: [0] }, 1, FLAGS)).toThrow(/not all zero/);
    expect(() => llamaServerArgs({ ...base, rpc: ['[::1]:1'] }, 1, FLAGS)).toThrow(/not a host:port/);
    expect(() => llamaServerArgs({ ...base, rpc: ['127.0.0.1:1'], devicesPerServer: [0] }, 1, FLAGS)).toThrow(/devicesPerServer/);
  });

  it('turns off the web UI, agent tools and MCP proxy and closes CORS where the release has the flags', () => {
    const hard = { ...FLAGS, apiKeyFile: true, noWebui: true, noAgent: true, noMcpProxy: true, corsOrigins: true, noCorsCredentials: true };
    const args = llamaServerArgs({ ...base, rpc: ['127.0.0.1:1'] }, 1, hard);
    for (const f of ['--no-webui', '--no-agent', '--no-ui-mcp-proxy', '--no-cors-credentials']) expect(args).toContain(f);
    expect(args[args.indexOf('--cors-origins') + 1]).toBe('https://mesh-inference.invalid');
    // The key is never in the args llamaServerArgs makes (the launcher adds only a file's path).
    expect(args.join(' ')).not.toMatch(/--api-key\b(?!-file)/);
    const old = llamaServerArgs({ ...base, rpc: ['127.0.0.1:1'] }, 1, FLAGS);
    expect(old.filter((a) => a.startsWith('--no-') || a.startsWith('--cors'))).toEqual([]);
  });

  it("removes llama.cpp's option variables from what llama-server inherits", () => {
    const env = llamaServerEnv({ GGML_NO_BACKTRACE: '1', LLAMA_ARG_TOOLS: 'all' }, { PATH: '/bin', LLAMA_ARG_TOOLS: 'all', LLAMA_ARG_AGENT: '1', llama_arg_ui_mcp_proxy: '1', LLAMA_API_KEY: 'x', HF_TOKEN: 't', LLAMA_CACHE: '/c' });
    expect(env).toEqual({ GGML_NO_BACKTRACE: '1', LLAMA_ARG_TOOLS: undefined, LLAMA_ARG_AGENT: undefined, llama_arg_ui_mcp_proxy: undefined, LLAMA_API_KEY: undefined, HF_TOKEN: undefined });
  });

  it('reads progress lines of the router-child protocol', () => {
    expect(parseProgressLine('cmd_child_to_router:state:{"state":"loading","payload":{"current":"text_model","stages":["text_model"],"value":0.25}}')).toEqual({ phase: 'loading', fraction: 0.25 });
    expect(parseProgressLine('cmd_child_to_router:state:{"state":"ready","payload":{}}')).toEqual({ phase: 'ready', fraction: 1 });
    expect(parseProgressLine('cmd_child_to_router:state:{"state":"sleeping","payload":{}}')).toBeNull();
    expect(parseProgressLine('cmd_child_to_router:state:{oops')).toBeNull();
  });
});

describe('llama-server for real', () => {
  let model: TempModel;
  const sockets: Socket[] = [];
  const servers: Server[] = [];
  beforeAll(async () => {
    model = await makeTempModel();
  });
  afterAll(async () => {
    await model.remove();
  });
  afterEach(async () => {
    for (const s of sockets.splice(0)) s.destroy();
    for (const s of servers.splice(0)) s.close();
    await stopAll(3000);
  });

  it('this release has --load-mode, --fit and --cache-ram, and every hardening flag (--api-key-file, --no-webui, --no-agent, --no-ui-mcp-proxy, CORS)', async () => {
    expect(await detectLlamaServerFlags(llamaBinaries().llamaServer)).toEqual({
      loadMode: true,
      fit: true,
      cacheRam: true,
      apiKeyFile: true,
      noWebui: true,
      noAgent: true,
      noMcpProxy: true,
      corsOrigins: true,
      noCorsCredentials: true,
    });
  });

  it('loads through two rpc-servers with progress, serves, and gives the same greedy tokens as one', async () => {
    const bins = llamaBinaries();
    const [a, b] = await Promise.all([startRpcServer({ binary: bins.rpcServer, threads: 1 }), startRpcServer({ binary: bins.rpcServer, threads: 1 })]);
    const progress: LlamaLoadProgress[] = [];
    const split = await startLlamaServer({
      binary: bins.llamaServer,
      model: model.path,
      rpc: [a.address, b.address],
      tensorSplit: [0.5, 0.5],
      threads: 1,
      ctxSize: 512,
      onProgress: (p) => progress.push(p),
    });
    expect(progress[0]).toMatchObject({ phase: 'loading' });
    expect(progress.some((p) => p.phase === 'loading' && p.fraction === 1)).toBe(true);
    expect(progress.at(-1)).toEqual({ phase: 'ready', fraction: 1 });
    expect(split.progress()).toEqual({ phase: 'ready', fraction: 1 });
    expect(await checkHealth(split.url)).toEqual({ kind: 'ok' });
    // Both rpc-servers really hold layers: each got a client and buffers.
    const out = await greedyCompletion(split, 'The quick brown fox', 32);
    expect(out.tokens.length).toBe(32);
    expect(new Set(out.tokens).size).toBeGreaterThanOrEqual(8);
    // A clean exit, not the SIGKILL after the grace: a plain SIGTERM hangs llama-server in this mode.
    expect(await split.stop(20_000)).toMatchObject({ code: 0, signal: null, requested: true });

    const solo = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [b.address], threads: 1, ctxSize: 512 });
    const soloOut = await greedyCompletion(solo, 'The quick brown fox', 32);
    expect(out.tokens).toEqual(soloOut.tokens);
    for (const rpc of [a, b]) expect(rpc.process.tail().join('\n')).toContain('Accepted client connection');
  });

  it('an rpc-server with two devices: -dev names three RPC devices, and the output still equals solo', async () => {
    const bins = llamaBinaries();
    const [two, own] = await Promise.all([
      startRpcServer({ binary: bins.rpcServer, threads: 1, devices: ['CPU', 'CPU'] }),
      startRpcServer({ binary: bins.rpcServer, threads: 1 }),
    ]);
    const devicesPerServer = [await rpcDeviceCount(two.address), await rpcDeviceCount(own.address)];
    expect(devicesPerServer).toEqual([2, 1]);
    const split = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [two.address, own.address], tensorSplit: [2, 1], devicesPerServer, threads: 1, ctxSize: 512 });
    expect(split.args.join(' ')).toContain('-dev RPC0,RPC1,RPC2 -ngl 999 --tensor-split 1,1,1');
    const out = await greedyCompletion(split, 'The quick brown fox', 16);
    await split.stop();
    const solo = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [own.address], threads: 1, ctxSize: 512 });
    expect(out.tokens).toEqual((await greedyCompletion(solo, 'The quick brown fox', 16)).tokens);
  });

  it('an rpc-server that dies under it turns the next request into a reported crash', async () => {
    const bins = llamaBinaries();
    const [a, b] = await Promise.all([startRpcServer({ binary: bins.rpcServer, threads: 1 }), startRpcServer({ binary: bins.rpcServer, threads: 1 })]);
    const server = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [a.address, b.address], threads: 1, ctxSize: 512 });
    await a.stop();
    await greedyCompletion(server, 'hello', 8).catch(() => undefined);
    const exit = await server.exited;
    expect(exit.requested).toBe(false);
    expect(exit.signal === 'SIGABRT' || exit.code === 134 || (exit.code ?? 0) !== 0).toBe(true);
    expect(exit.tail.length).toBeGreaterThan(0);
  });

  it('an unreachable rpc-server at start: a clear error with the status and the log', async () => {
    const bins = llamaBinaries();
    const deadPort = await freeLoopbackPort();
    const err = await launchLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [`127.0.0.1:${deadPort}`], ctxSize: 512 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlamaServerError);
    expect((err as Error).message).toMatch(/^llama-server (was killed by SIGABRT|exited with status \d+) before its HTTP port was up/);
    expect((err as LlamaServerError).tail.join('\n')).toMatch(new RegExp(String(deadPort)));
  });

  it('a busy rpc-server at start: the launch is bounded and says why', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    // Another client holds it (an rpc-server serves one client at a time; others wait, silently).
    const holder = connect({ host: '127.0.0.1', port: rpc.port });
    sockets.push(holder);
    await new Promise<void>((r) => holder.once('connect', () => r()));
    const hello = Buffer.alloc(33);
    hello[0] = 14;
    hello.writeBigUInt64LE(24n, 1);
    holder.write(hello);
    await new Promise((r) => holder.once('data', r));
    const err = await launchLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [rpc.address], ctxSize: 512, launchTimeoutMs: 3000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlamaServerError);
    expect((err as Error).message).toMatch(/did not get to loading within 3000 ms: an rpc-server .* accepts but does not answer/);
  });

  it('a model that is not a GGUF: exits while loading, and waitHealthy says so', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    const err = await startLlamaServer({ binary: bins.llamaServer, model: '/etc/hostname', rpc: [rpc.address], ctxSize: 512 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlamaServerError);
    expect((err as Error).message).toMatch(/^llama-server exited with status 1 (while loading|before its HTTP port was up)/);
  });

  it('a taken fixed port: a clear error', async () => {
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    const squatter = createServer();
    servers.push(squatter);
    await new Promise<void>((r) => squatter.listen(0, '127.0.0.1', () => r()));
    const port = (squatter.address() as { port: number }).port;
    const err = await launchLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [rpc.address], ctxSize: 512, port }).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/couldn't bind HTTP server socket/);
  });
});

describe('the llama-server machine with the real actor logic', () => {
  it('a two-stage plan: ready and serving; a crash is reported with the signal; restart; stop', async () => {
    const { createActor, fromCallback } = await import('xstate');
    const { llamaServerMachine } = await import('../src/machines/llama-server.machine.ts');
    const { llamaServerProcessLogic, waitLlamaHealthyLogic, rpcLayout } = await import('../src/actors/llama-server.actor.ts');
    const { asEndpointId } = await import('../src/machines/mesh-types.ts');
    const model = await makeTempModel();
    try {
      const bins = llamaBinaries();
      // The worker's rpc-server stands where the mesh's tunnel to it would be; the host's own is last.
      const [worker, own] = await Promise.all([startRpcServer({ binary: bins.rpcServer, threads: 1 }), startRpcServer({ binary: bins.rpcServer, threads: 1 })]);
      const host = asEndpointId('aa'.repeat(32));
      const workerId = asEndpointId('bb'.repeat(32));
      const plan = {
        kind: 'ready' as const,
        id: 'plan-1',
        host,
        stages: [{ id: workerId, share: 0.6 }, { id: host, share: 0.4 }],
        model: { name: 'tiny', bytes: 1, fingerprint: 'f' },
      };
      const input = { plan, generation: 1, ownRpcPort: own.port };
      const rpcAddressFor = (stage: { id: string }) => {
        if (stage.id !== workerId) throw new Error(`no tunnel for ${stage.id}`);
        return worker.address;
      };
      expect(await rpcLayout(input, rpcAddressFor)).toEqual({ rpc: [worker.address, own.address], tensorSplit: [0.6, 0.4] });
      await expect(rpcLayout({ ...input, plan: { ...plan, stages: [...plan.stages].reverse() } }, rpcAddressFor)).rejects.toThrow(/must come last/);

      const notices: { type: string; port?: number; reason?: string; planId?: string | null }[] = [];
      const owner = createActor(fromCallback(({ receive }) => receive((e) => void notices.push(e as never)))).start();
      const started: LlamaServerProcess[] = [];
      const progress: string[] = [];
      const machine = llamaServerMachine.provide({
        actors: {
          llamaServerProcess: llamaServerProcessLogic({
            binary: bins.llamaServer,
            model: model.path,
            rpcAddressFor,
            threads: 1,
            ctxSize: 512,
            killGraceMs: 2000,
            onStarted: (s) => started.push(s),
            onProgress: (p) => progress.push(`${p.planId}/${p.generation}:${p.phase}`),
          }),
          waitLlamaHealthy: waitLlamaHealthyLogic,
        },
      });
      const actor = createActor(machine, { input: { notify: owner } }).start();
      const next = async (type: string) => {
        const deadline = Date.now() + 60_000;
        while (Date.now() < deadline) {
          const i = notices.findIndex((n) => n.type === type);
          if (i >= 0) return notices.splice(0, i + 1).at(-1)!;
          await new Promise((r) => setTimeout(r, 20));
        }
        throw new Error(`no ${type}; got ${JSON.stringify(notices)}`);
      };

      actor.send({ type: 'llama.start', ...input });
      const ready = await next('llama.ready');
      expect(ready).toMatchObject({ port: started[0]!.port, planId: 'plan-1', generation: 1 });
      expect(started[0]!.args.join(' ')).toContain(`--rpc ${worker.address},${own.address} -dev RPC0,RPC1 -ngl 999 --tensor-split 0.6,0.4`);
      expect(progress).toContain('plan-1/1:loading');
      const authHeaders = { authorization: `Bearer ${llamaServerKeyFor(ready.port!)}` };
      const models = (await (await fetch(`http://127.0.0.1:${ready.port}/v1/models`, { headers: authHeaders })).json()) as { data: { id: string }[] };
      expect(models.data.map((m) => m.id)).toContain('tiny');
      const out = await greedyCompletion({ url: `http://127.0.0.1:${ready.port}`, authHeaders }, 'hello', 8);
      expect(out.tokens).toHaveLength(8);

      process.kill(started[0]!.process.pid, 'SIGKILL');
      const crash = await next('llama.crashed');
      expect(crash.reason).toMatch(/^llama-server exited: llama-server was killed by SIGKILL on its own/);
      expect(crash.planId).toBe('plan-1');

      actor.send({ type: 'llama.start', ...input, generation: 2 });
      expect(await next('llama.ready')).toMatchObject({ generation: 2 });
      actor.send({ type: 'llama.stop' });
      expect(await next('llama.stopped')).toMatchObject({ planId: 'plan-1' });
      expect(started[1]!.process.exitInfo()).toMatchObject({ requested: true, code: 0, signal: null });
      actor.stop();
      owner.stop();
    } finally {
      await stopAll(3000);
      await model.remove();
    }
  });
});
