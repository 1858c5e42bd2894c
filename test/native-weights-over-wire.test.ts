// Weights never cross silently: when a worker's rpc-server refuses to load a weight from its own GGUF (patch
// 0001) and llama-server sends the bytes instead, patch 0001's client prints one line per weight, the launcher
// parses them, the llama-server actor maps each `--rpc` endpoint to its stage, reports them (what /api/status
// shows) and warns once per worker when the model is loaded. Real processes on loopback, generated models: one
// worker serves another model's GGUF (same shape, another seed: every weight refused), one serves the right one.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createActor, fromCallback } from 'xstate';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { llamaServerProcessLogic, waitLlamaHealthyLogic, type WeightsOverWireReport } from '../src/actors/llama-server.actor.ts';
import { readGgufHeader, type GgufHeader } from '../src/io/gguf/gguf-reader.ts';
import { generateLlamaGguf, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';
import { createLogger } from '../src/io/host/logger.ts';
import { parseWeightsSentAsBytes, WeightsOverWireTally } from '../src/io/llama/llama-server-output.ts';
import type { LlamaServerProcess } from '../src/io/llama/llama-server-process.ts';
import { startRpcTrafficProxy } from '../src/io/llama/rpc-traffic.ts';
import { llamaServerMachine } from '../src/machines/llama-server.machine.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { greedyCompletion, llamaBinaries, startRpcServer, type RpcServerHandle } from './helpers/llama.ts';
import { MESH_RPC_COMMANDS } from './native-support.ts';

describe('parseWeightsSentAsBytes', () => {
  it('reads the line with or without llama.cpp\'s log prefix and colours, and nothing else', () => {
    const w = { endpoint: '127.0.0.1:4001', name: 'blk.0.attn_q.weight', bytes: 8388608, reason: 'content differs' };
    expect(parseWeightsSentAsBytes("RPC[127.0.0.1:4001]: weights sent as bytes: 'blk.0.attn_q.weight' 8388608 bytes (content differs)")).toEqual(w);
    expect(parseWeightsSentAsBytes("0.00.343.870 W RPC[127.0.0.1:4001]: weights sent as bytes: 'blk.0.attn_q.weight' 8388608 bytes (content differs)  ")).toEqual(w);
    expect(parseWeightsSentAsBytes("\x1b[35m0.00.343.870 W \x1b[0mRPC[127.0.0.1:4001]: weights sent as bytes: 'blk.0.attn_q.weight' 8388608 bytes (content differs)\x1b[0m")).toEqual(w);
    expect(parseWeightsSentAsBytes("RPC[node-b.lan:50052]: weights sent as bytes: 'blk.3.ffn_up.weight' 65536 bytes (not asked: the server refused 8 in a row)")).toEqual({
      endpoint: 'node-b.lan:50052',
      name: 'blk.3.ffn_up.weight',
      bytes: 65536,
      reason: 'not asked: the server refused 8 in a row',
    });
    expect(parseWeightsSentAsBytes("RPC[127.0.0.1:4001]: server refused to load 'blk.0.attn_q.weight' from its GGUF (content differs); sending the bytes")).toBeNull();
    expect(parseWeightsSentAsBytes("RPC[127.0.0.1:4001]: weights sent as bytes: 'x' many bytes (content differs)")).toBeNull();
  });

  it('the tally counts a weight sent in pieces once, sums the bytes, and keeps the first 20 names', () => {
    const t = new WeightsOverWireTally();
    t.add('w', { name: 'a', bytes: 10 });
    t.add('w', { name: 'a', bytes: 5 });
    for (let i = 0; i < 30; i++) t.add('w', { name: `t${i}`, bytes: 1 });
    t.add('v', { name: 'b', bytes: 7 });
    const s = t.snapshot();
    expect(s['v']).toEqual({ tensors: 1, bytes: 7, names: ['b'] });
    expect(s['w']!.tensors).toBe(31);
    expect(s['w']!.bytes).toBe(45);
    expect(s['w']!.names).toEqual(['a', ...Array.from({ length: 19 }, (_, i) => `t${i}`)]);
  });
});

// 4 layers of width 256 (F16): attention matrices 128 KiB, FFN 384 KiB, all over the patch's 64 KiB minimum;
// the norms (1 KiB) always go as bytes by design and must not be counted.
const SPEC = { layers: 4, embd: 256, ff: 768, type: 'f16' } as const satisfies Omit<LlamaModelSpec, 'seed'>;
const MIN_GGUF_BYTES = 64 * 1024;

describe('weights sent as bytes after a GGUF refusal: reported per worker and warned about', () => {
  let dir = '';
  let right = '';
  let header: GgufHeader;
  const servers: RpcServerHandle[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mesh-over-wire-'));
    right = join(dir, 'right.gguf');
    const wrong = join(dir, 'wrong.gguf');
    await generateLlamaGguf(right, { ...SPEC, seed: 1 });
    await generateLlamaGguf(wrong, { ...SPEC, seed: 2 }); // same names and shapes, other bytes
    header = await readGgufHeader(right);
    const bins = llamaBinaries();
    for (const gguf of [wrong, right, right]) servers.push(await startRpcServer({ binary: bins.rpcServer, extraArgs: ['--gguf', gguf] }));
  }, 60_000);

  afterAll(async () => {
    for (const s of servers.splice(0)) await s.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('the worker with another model\'s GGUF: every weight it holds, its bytes, one warning; the others: none', async () => {
    const [wrongServer, rightServer, ownServer] = servers as [RpcServerHandle, RpcServerHandle, RpcServerHandle];
    const host = asEndpointId('aa'.repeat(32));
    const wrongId = asEndpointId('bb'.repeat(32));
    const rightId = asEndpointId('cc'.repeat(32));
    // A counting proxy in front of the wrong worker: what really crossed to it.
    const proxy = await startRpcTrafficProxy({ target: wrongServer.address, extraCommands: MESH_RPC_COMMANDS });
    const address = new Map([[wrongId, proxy.address], [rightId, rightServer.address]]);
    const plan = {
      kind: 'ready' as const,
      id: 'plan-w',
      host,
      // 2 or more layers on the wrong worker: 14+ matrices, more than the 8 refusals after which the client stops asking
      stages: [{ id: wrongId, share: 0.5 }, { id: rightId, share: 0.25 }, { id: host, share: 0.25 }],
      model: { name: 'tiny', bytes: 1, fingerprint: 'f' },
    };
    const logLines: Record<string, unknown>[] = [];
    const logger = createLogger({ pretty: false, level: 'debug', destination: { write: (s: string) => void logLines.push(JSON.parse(s) as Record<string, unknown>) } });
    const reports: WeightsOverWireReport[] = [];
    const started: LlamaServerProcess[] = [];
    const notices: { type: string }[] = [];
    const owner = createActor(fromCallback(({ receive }) => receive((e) => void notices.push(e as never)))).start();
    const machine = llamaServerMachine.provide({
      actors: {
        llamaServerProcess: llamaServerProcessLogic({
          binary: llamaBinaries().llamaServer,
          model: right,
          rpcAddressFor: (stage) => address.get(stage.id)!,
          threads: 1,
          ctxSize: 512,
          killGraceMs: 2000,
          env: { GGML_RPC_NO_RDMA: '1' },
          logger,
          onStarted: (s) => started.push(s),
          onWeightsOverWire: (w) => reports.push(w),
        }),
        waitLlamaHealthy: waitLlamaHealthyLogic,
      },
    });
    const actor = createActor(machine, { input: { notify: owner } }).start();
    try {
      actor.send({ type: 'llama.start', plan, generation: 1, ownRpcPort: ownServer.port });
      const deadline = Date.now() + 90_000;
      while (!notices.some((n) => n.type === 'llama.ready')) {
        if (Date.now() > deadline || notices.some((n) => n.type === 'llama.crashed')) throw new Error(`not ready: ${JSON.stringify(notices)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      // it serves, with the bytes it sent
      expect((await greedyCompletion(started[0]!, 'Once upon a time', 8)).tokens).toHaveLength(8);

      // reset at the launch, then one report per weight: the last is the whole generation's
      expect(reports[0]).toEqual({ planId: 'plan-w', generation: 1, byStage: {} });
      const last = reports.at(-1)!;
      expect(Object.keys(last.byStage)).toEqual([wrongId]);
      const w = last.byStage[wrongId]!;
      // exactly what llama-server printed (read here with a regex of the test's own from its raw output, which
      // the launcher logs at debug level): every weight it sent to the wrong worker, each over the GGUF path's
      // minimum (no norms), past the 8 refusals after which the client stops asking
      const printed = logLines
        .map((l) => /RPC\[([^\]]+)\]: weights sent as bytes: '([^']+)' (\d+) bytes \((.+)\)$/.exec(String(l['msg'])))
        .filter((m) => m !== null)
        .map((m) => ({ endpoint: m[1], name: m[2]!, bytes: Number(m[3]), reason: m[4] }));
      expect(printed.length).toBeGreaterThan(8);
      expect(new Set(printed.map((p) => p.endpoint))).toEqual(new Set([proxy.address]));
      expect(printed.some((p) => p.reason === 'content differs')).toBe(true);
      expect(printed.some((p) => p.reason!.startsWith('not asked'))).toBe(true);
      const size = new Map(header.tensors.map((t) => [t.name, t.bytes]));
      for (const p of printed) {
        expect(p.bytes).toBe(size.get(p.name));
        expect(p.bytes).toBeGreaterThanOrEqual(MIN_GGUF_BYTES);
        expect(p.name).toMatch(/^blk\.\d+\./);
      }
      const names = [...new Set(printed.map((p) => p.name))];
      expect(w.tensors).toBe(names.length);
      expect(w.bytes).toBe(printed.reduce((a, p) => a + p.bytes, 0));
      expect(w.names).toEqual(names.slice(0, 20));
      // whole layers: every matrix of each layer it holds
      const layers = new Set(names.map((n) => /^blk\.(\d+)\./.exec(n)![1]));
      expect(w.tensors).toBe(7 * layers.size);
      // and they did cross: the proxy saw at least those bytes in SET_TENSOR
      expect(proxy.snapshot().commands.SET_TENSOR?.bytesToServer ?? 0).toBeGreaterThanOrEqual(w.bytes);
      // the process's own tally, by endpoint as in --rpc
      expect(started[0]!.weightsOverWire()).toEqual({ [proxy.address]: w });

      // one warning, for the wrong worker, once the model is loaded
      const warnings = logLines.filter((l) => typeof l['msg'] === 'string' && (l['msg'] as string).startsWith('weights crossed the network'));
      expect(warnings).toHaveLength(1);
      const mib = (w.bytes / 1024 / 1024).toFixed(1);
      expect(warnings[0]!['msg']).toMatch(new RegExp(`^weights crossed the network to ${wrongId}: ${w.tensors} tensors, ${mib.replace('.', '\\.')} MiB \\(first: blk\\.`));
      expect(warnings[0]).toMatchObject({ level: 40, worker: wrongId, endpoint: proxy.address, tensors: w.tensors, bytes: w.bytes, names: w.names });
      const readyAt = logLines.findIndex((l) => l['phase'] === 'ready');
      expect(readyAt).toBeGreaterThanOrEqual(0);
      expect(logLines.indexOf(warnings[0]!)).toBeGreaterThan(readyAt);
    } finally {
      actor.stop();
      owner.stop();
      for (const s of started) await s.stop(2000);
      await proxy.close();
    }
  }, 120_000);
});
