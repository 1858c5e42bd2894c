// SET_TENSOR_GGUF end to end: real patched and stock llama.cpp binaries, real processes on loopback, generated
// models, and a counting proxy in front of every rpc-server. Weights must come from each worker's own GGUF
// (under 1% of the model crosses the wire) with the same greedy tokens as when every byte is sent.
import { copyFile, mkdtemp, readFile, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readGgufHeader, type GgufHeader } from '../src/io/gguf/gguf-reader.ts';
import { generateLlamaGguf, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';
import { buildBinDir, ensureLlamaBinaries, type LlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { startRpcTrafficProxy, type RpcTrafficProxy, type RpcTrafficSnapshot } from '../src/io/llama/rpc-traffic.ts';
import { greedyCompletion } from './helpers/llama.ts';
import {
  GGUF_RESULT,
  MESH_RPC_COMMANDS,
  RawRpcClient,
  encodeRpcTensor,
  runToExit,
  startNativeLlamaServer,
  startNativeRpcServer,
  xxh64,
  type NativeRpcServer,
} from './native-support.ts';


// 4 layers of width 256 (F16): ~40 MB, and every matrix is over the patch's 64 KiB minimum, so only the
// norms (1 KB each) travel as bytes. The vocab comes from our own source tree, which the build unpacked.
const SHAPE = { layers: 4, embd: 256, ff: 768, type: 'f16' } as const;
const PROMPT = 'Once upon a time, in a land far away,';
const N_PREDICT = 32;

const hold: { dir: string; mesh?: LlamaBinaries; stock?: LlamaBinaries } = { dir: '' };
let modelA = '';
let modelB = '';
let headerA: GgufHeader;
const children: { stop(): Promise<void> }[] = [];

async function makeModel(path: string, seed: number, type: LlamaModelSpec['type'] = SHAPE.type): Promise<void> {
  const spec: LlamaModelSpec = {
    ...SHAPE,
    type,
    seed,
    vocabPath: join(buildBinDir('mesh'), '..', '..', 'src', 'models', 'ggml-vocab-llama-spm.gguf'),
  };
  await generateLlamaGguf(path, spec);
}

interface Run {
  readonly tokens: readonly number[];
  /** Traffic to each rpc-server from spawn to /health 200 (load and warm-up). */
  readonly load: RpcTrafficSnapshot[];
  readonly loadMs: number;
}

/** llama-server through a counting proxy per rpc-server, all layers on the rpc-servers (split 1:1). */
async function runThrough(servers: readonly NativeRpcServer[], env: Record<string, string> = {}, model = modelA): Promise<Run> {
  const proxies: RpcTrafficProxy[] = [];
  try {
    for (const s of servers) proxies.push(await startRpcTrafficProxy({ target: s.address, extraCommands: MESH_RPC_COMMANDS }));
    const llama = await startNativeLlamaServer(hold.mesh!.llamaServer, {
      model,
      rpc: proxies.map((p) => p.address),
      extraArgs: ['--tensor-split', servers.map(() => '1').join(',')],
      env,
    });
    try {
      const load = proxies.map((p) => p.snapshot());
      const { tokens } = await greedyCompletion(llama, PROMPT, N_PREDICT);
      return { tokens, load, loadMs: llama.loadMs };
    } finally {
      await llama.stop();
    }
  } finally {
    for (const p of proxies) await p.close();
  }
}

async function rpcServer(bins: LlamaBinaries, args: string[] = []): Promise<NativeRpcServer> {
  const s = await startNativeRpcServer(bins.rpcServer, args);
  children.push(s);
  return s;
}

const bytesIn = (s: RpcTrafficSnapshot): number => s.totals.bytesToServer;
const ggufCalls = (s: RpcTrafficSnapshot): number => s.commands.SET_TENSOR_GGUF?.count ?? 0;
/** What the host keeps for itself: the input layer (token embeddings) stays on its CPU. */
const offloadedBytes = (h: GgufHeader): number => h.tensors.filter((t) => t.name !== 'token_embd.weight').reduce((a, t) => a + t.bytes, 0);

/** Bytes of one transformer block: what a worker holding at least one layer must have received. */
const layerBytes = (h: GgufHeader): number => h.tensors.filter((t) => t.name.startsWith('blk.0.')).reduce((a, t) => a + t.bytes, 0);

// Missing binaries (mesh or stock) are failures, not skips: a skipped suite would prove nothing.
describe('native: SET_TENSOR_GGUF', () => {
  beforeAll(async () => {
    hold.mesh = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => console.log(l) });
    hold.stock = await ensureLlamaBinaries({ variant: 'stock', onLine: (l) => console.log(l) });
    hold.dir = await mkdtemp(join(tmpdir(), 'mesh-native-'));
    modelA = join(hold.dir, 'a.gguf');
    modelB = join(hold.dir, 'b.gguf');
    await makeModel(modelA, 1);
    await makeModel(modelB, 2); // same shape and names, other weights: "another model file"
    headerA = await readGgufHeader(modelA);
  }, 40 * 60_000);

  afterAll(async () => {
    for (const c of children.splice(0)) await c.stop();
    if (hold.dir) await rm(hold.dir, { recursive: true, force: true });
  });

  describe('weights load from each worker\'s own GGUF', () => {
  let reference: Run; // every byte sent (patched client told not to use the GGUF path)

  it('the build carries the patch and the stock build does not', () => {
    expect(hold.mesh!.setTensorGguf).toBe(true);
    expect(hold.mesh!.patches).toContain('set-tensor-gguf/1');
    expect(hold.stock!.patches).toEqual([]);
  });

  it('sends about the whole model when told not to use the GGUF path (the reference)', async () => {
    const a = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const b = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    reference = await runThrough([a, b], { GGML_RPC_NO_GGUF: '1' });
    await a.stop();
    await b.stop();
    const sent = reference.load.reduce((x, s) => x + bytesIn(s), 0);
    console.log(`bytes sent: ${sent} for ${offloadedBytes(headerA)} offloaded bytes of a ${headerA.fileBytes}-byte model`);
    expect(reference.load.map(ggufCalls)).toEqual([0, 0]);
    expect(sent).toBeGreaterThanOrEqual(offloadedBytes(headerA));
    expect(sent).toBeLessThan(headerA.fileBytes * 1.05);
    // a real test of equality needs varied output
    expect(reference.tokens).toHaveLength(N_PREDICT);
    expect(new Set(reference.tokens).size).toBeGreaterThanOrEqual(8);
  }, 180_000);

  it('with --gguf on both workers, under 1% of the model crosses the wire and the tokens are the same', async () => {
    const a = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const b = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const run = await runThrough([a, b]);
    await a.stop();
    await b.stop();
    const sent = run.load.reduce((x, s) => x + bytesIn(s), 0);
    console.log(`bytes sent: ${sent} (${((100 * sent) / headerA.fileBytes).toFixed(3)}% of the model)`);
    // each worker loaded its share by name, and both received graph computations
    for (const s of run.load) {
      expect(ggufCalls(s)).toBeGreaterThan(0);
      expect(s.commands.SET_TENSOR_GGUF!.roundTrips).toBe(s.commands.SET_TENSOR_GGUF!.count);
      expect((s.commands.GRAPH_COMPUTE?.count ?? 0) + (s.commands.GRAPH_RECOMPUTE?.count ?? 0)).toBeGreaterThan(0);
      // patch 0002 (rpc-keepalive): one connection and one HELLO per rpc-server for the whole load
      expect(s.connectionsOpened).toBe(1);
      expect(s.commands.HELLO?.count).toBe(1);
    }
    expect(sent).toBeLessThan(headerA.fileBytes * 0.01);
    expect(run.tokens).toEqual(reference.tokens);
  }, 180_000);

  it('a stock rpc-server still serves the patched llama-server (bytes are sent to it)', async () => {
    const stock = await rpcServer(hold.stock!);
    const patched = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const run = await runThrough([stock, patched]);
    await stock.stop();
    await patched.stop();
    const [toStock, toPatched] = run.load as [RpcTrafficSnapshot, RpcTrafficSnapshot];
    expect(ggufCalls(toStock)).toBe(0); // never sent a command it does not know
    expect(toStock.commands.SET_TENSOR?.bytesToServer ?? 0).toBeGreaterThanOrEqual(layerBytes(headerA));
    expect(ggufCalls(toPatched)).toBeGreaterThan(0);
    expect(bytesIn(toPatched)).toBeLessThan(headerA.fileBytes * 0.01);
    expect(run.tokens).toEqual(reference.tokens);
  }, 180_000);

  it('a patched rpc-server with --gguf still serves a stock llama-server', async () => {
    const a = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const b = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const proxies = [
      await startRpcTrafficProxy({ target: a.address, extraCommands: MESH_RPC_COMMANDS }),
      await startRpcTrafficProxy({ target: b.address, extraCommands: MESH_RPC_COMMANDS }),
    ];
    try {
      const llama = await startNativeLlamaServer(hold.stock!.llamaServer, {
        model: modelA,
        rpc: proxies.map((p) => p.address),
        extraArgs: ['--tensor-split', '1,1'],
      });
      try {
        const { tokens } = await greedyCompletion(llama, PROMPT, N_PREDICT);
        expect(tokens).toEqual(reference.tokens);
      } finally {
        await llama.stop();
      }
      for (const p of proxies) {
        expect(ggufCalls(p.snapshot())).toBe(0);
        // what patch 0002 removes: the stock client reconnects (TCP + HELLO) for short-lived users
        expect(p.snapshot().connectionsOpened).toBeGreaterThan(1);
      }
    } finally {
      for (const p of proxies) await p.close();
      await a.stop();
      await b.stop();
    }
  }, 180_000);

  it('quantized weights (Q8_0, rows not a multiple of 512: the INIT_TENSOR path) load by name too, same tokens', async () => {
    const q8 = join(hold.dir, 'q8.gguf');
    await makeModel(q8, 1, 'q8_0');
    const qHeader = await readGgufHeader(q8);
    const runs: Run[] = [];
    for (const env of [{ GGML_RPC_NO_GGUF: '1' }, {}] as Record<string, string>[]) {
      const a = await rpcServer(hold.mesh!, ['--gguf', q8]);
      const b = await rpcServer(hold.mesh!, ['--gguf', q8]);
      runs.push(await runThrough([a, b], env, q8));
      await a.stop();
      await b.stop();
    }
    const [bytes, gguf] = runs as [Run, Run];
    expect(bytes.load.reduce((x, s) => x + bytesIn(s), 0)).toBeGreaterThanOrEqual(offloadedBytes(qHeader));
    // this model is half the F16 one, so the fixed traffic (graphs, alloc-size queries: ~200 KB) weighs more:
    // the weights' own traffic (SET_TENSOR: norms and warm-up inputs) stays under 1%
    const setBytes = (s: RpcTrafficSnapshot): number => s.commands.SET_TENSOR?.bytesToServer ?? 0;
    expect(gguf.load.reduce((x, s) => x + setBytes(s), 0)).toBeLessThan(qHeader.fileBytes * 0.01);
    expect(gguf.load.reduce((x, s) => x + bytesIn(s), 0)).toBeLessThan(qHeader.fileBytes * 0.02);
    expect(gguf.load.every((s) => (s.commands.INIT_TENSOR?.count ?? 0) > 0)).toBe(true);
    expect(new Set(bytes.tokens).size).toBeGreaterThanOrEqual(8);
    expect(gguf.tokens).toEqual(bytes.tokens);
  }, 180_000);

  it('a worker whose GGUF is another model is refused per tensor, gets the bytes, and the tokens are the same', async () => {
    const other = await rpcServer(hold.mesh!, ['--gguf', modelB]);
    const same = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    const run = await runThrough([other, same]);
    await other.stop();
    await same.stop();
    const [toOther, toSame] = run.load as [RpcTrafficSnapshot, RpcTrafficSnapshot];
    // the client stops asking after a run of refusals, so a wrong file costs a bounded number of round trips
    expect(ggufCalls(toOther)).toBeGreaterThan(0);
    expect(ggufCalls(toOther)).toBeLessThanOrEqual(8);
    expect(toOther.commands.SET_TENSOR?.bytesToServer ?? 0).toBeGreaterThanOrEqual(layerBytes(headerA));
    expect(bytesIn(toSame)).toBeLessThan(headerA.fileBytes * 0.01);
    expect(run.tokens).toEqual(reference.tokens);
  }, 180_000);
  });

  describe('hand-made requests', () => {
  let server: NativeRpcServer;
  let client: RawRpcClient;
  let base = 0n;
  let bufPtr = 0n;
  // blk.0.attn_q.weight: F16 [256, 256] = 128 KiB
  const NAME = 'blk.0.attn_q.weight';
  const BYTES = 256 * 256 * 2;
  let fileBytes: Buffer;
  let truncated = '';
  let hello: Awaited<ReturnType<RawRpcClient['hello']>>;

  beforeAll(async () => {
    const info = headerA.tensors.find((t) => t.name === NAME)!;
    expect(info.bytes).toBe(BYTES);
    fileBytes = (await readFile(modelA)).subarray(info.absoluteOffset, info.absoluteOffset + BYTES);
    server = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    client = await RawRpcClient.connect(server.address);
    hello = await client.hello();
    // twice the tensor, so that a request can stay inside the buffer yet outside the GGUF tensor
    const buf = await client.allocBuffer(2 * BYTES);
    bufPtr = buf.ptr;
    base = await client.bufferBase(buf.ptr);
    truncated = join(hold.dir, 'truncated.gguf');
    await copyFile(modelA, truncated);
  }, 60_000);

  afterAll(() => client?.close());

  const dest = (ne: number[] = [256, 256], type = 1, elementBytes = 2) =>
    encodeRpcTensor({ type, ne, elementBytes, buffer: bufPtr, data: base, name: 'dest' });

  it('a patched server announces the capability without changing the version a stock client checks', () => {
    // a stock client refuses a server whose minor version is newer than its own: it must stay 6.0
    expect(hello).toEqual({ major: 6, minor: 0, patch: 0, meshCaps: 0x81 });
  });

  it('loads a tensor by name when the hash matches, and the destination then holds the file\'s bytes', async () => {
    expect(await client.setTensorGguf(dest(), NAME, 0, BYTES, xxh64(fileBytes))).toBe(GGUF_RESULT.LOADED);
    expect((await client.getTensor(dest(), 0, BYTES)).equals(fileBytes)).toBe(true);
    // a part of it, at an offset
    expect(await client.setTensorGguf(dest(), NAME, 4096, 8192, xxh64(fileBytes.subarray(4096, 4096 + 8192)))).toBe(GGUF_RESULT.LOADED);
  });

  it('refuses an unknown name, a type or size that differs, a range outside the tensor, and other content', async () => {
    const h = xxh64(fileBytes);
    expect(await client.setTensorGguf(dest(), 'blk.99.attn_q.weight', 0, BYTES, h)).toBe(GGUF_RESULT.UNKNOWN_NAME);
    expect(await client.setTensorGguf(dest(), '', 0, BYTES, h)).toBe(GGUF_RESULT.UNKNOWN_NAME);
    // destination shaped [256, 128]: not the GGUF tensor's size
    expect(await client.setTensorGguf(dest([256, 128]), NAME, 0, BYTES / 2, h)).toBe(GGUF_RESULT.MISMATCH);
    // same byte count, other type (F32 [128, 256] vs F16 [256, 256])
    expect(await client.setTensorGguf(dest([128, 256], 0, 4), NAME, 0, BYTES, h)).toBe(GGUF_RESULT.MISMATCH);
    // inside the destination buffer (it is twice as large) but past the GGUF tensor's end
    const wide = encodeRpcTensor({ type: 1, ne: [256, 512], elementBytes: 2, buffer: bufPtr, data: base });
    expect(await client.setTensorGguf(wide, NAME, 0, 2 * BYTES, h)).toBe(GGUF_RESULT.MISMATCH);
    expect(await client.setTensorGguf(dest(), NAME, BYTES - 16, 32, h)).toBe(GGUF_RESULT.OUT_OF_RANGE);
    expect(await client.setTensorGguf(dest(), NAME, 8, BYTES, h)).toBe(GGUF_RESULT.OUT_OF_RANGE);
    // right place, wrong bytes: the hash of other content
    expect(await client.setTensorGguf(dest(), NAME, 0, BYTES, h ^ 1n)).toBe(GGUF_RESULT.HASH_DIFFERS);
    // the server is still serving this connection after all refusals
    expect(await client.setTensorGguf(dest(), NAME, 0, BYTES, h)).toBe(GGUF_RESULT.LOADED);
  });

  it('verifies the hash before it writes: a wrong hash leaves the destination as it was (no reading weights back)', async () => {
    // its own buffer, so earlier loads into the shared one cannot make the check pass
    const buf = await client.allocBuffer(BYTES);
    const b = await client.bufferBase(buf.ptr);
    const t = encodeRpcTensor({ type: 1, ne: [256, 256], elementBytes: 2, buffer: buf.ptr, data: b });
    const before = Buffer.alloc(BYTES, 0x5a); // what "was there": a pattern, not the file's bytes
    client.setTensor(t, 0, before);
    expect((await client.getTensor(t, 0, BYTES)).equals(before)).toBe(true);
    // a member that knows the name but not the bytes: any hash but the right one
    for (const [offset, size] of [[0, BYTES], [4096, 8192], [BYTES - 64, 64]] as [number, number][]) {
      expect(await client.setTensorGguf(t, NAME, offset, size, xxh64(fileBytes.subarray(offset, offset + size)) ^ 1n)).toBe(
        GGUF_RESULT.HASH_DIFFERS,
      );
      const after = await client.getTensor(t, 0, BYTES);
      expect(after.equals(before)).toBe(true); // not one byte of the file went in
      expect(after.subarray(offset, offset + size).equals(fileBytes.subarray(offset, offset + size))).toBe(false);
    }
    // the right hash for the same region loads it (so the region, name and buffer were fine)
    expect(await client.setTensorGguf(t, NAME, 4096, 8192, xxh64(fileBytes.subarray(4096, 4096 + 8192)))).toBe(GGUF_RESULT.LOADED);
    const loaded = await client.getTensor(t, 0, BYTES);
    expect(loaded.subarray(4096, 4096 + 8192).equals(fileBytes.subarray(4096, 4096 + 8192))).toBe(true);
    expect(loaded.subarray(0, 4096).equals(before.subarray(0, 4096))).toBe(true);
    client.freeBuffer(buf.ptr);
  });

  it('closes the connection on a destination outside its buffer (offset or size overflowing), and keeps serving others', async () => {
    // its own server: an rpc-server serves one connection at a time, and `client` holds the shared one
    const s = await rpcServer(hold.mesh!, ['--gguf', modelA]);
    try {
      for (const [offset, size] of [[0xffffffffffffff00n, 256n], [0n, 0xffffffffffffffffn], [-1n, 0n]] as [bigint, bigint][]) {
        const c = await RawRpcClient.connect(s.address);
        await c.hello();
        const buf = await c.allocBuffer(BYTES);
        const b = await c.bufferBase(buf.ptr);
        const t = encodeRpcTensor({ type: 1, ne: [256, 256], elementBytes: 2, buffer: buf.ptr, data: b });
        // -1n: the first byte past the buffer
        const off = offset === -1n ? buf.size : offset;
        await expect(c.setTensorGgufRaw(t, NAME, off, size === 0n ? 16n : size, 0n)).rejects.toThrow(/closed the connection/);
        c.close();
      }
      const c = await RawRpcClient.connect(s.address);
      try {
        expect((await c.hello()).meshCaps).toBe(0x81);
      } finally {
        c.close();
      }
    } finally {
      await s.stop();
    }
  });

  it('refuses to start on a truncated GGUF, and answers READ_FAILED when the file shrinks under it', async () => {
    const info = headerA.tensors.find((t) => t.name === 'output.weight')!; // the last tensor in the file
    await truncate(truncated, info.absoluteOffset + 100);
    const refused = await runToExit(hold.mesh!.rpcServer, ['-p', '1', '--gguf', truncated]);
    expect(refused.code).not.toBe(0);
    expect(refused.output).toMatch(/truncated/);

    // a server started on the whole file, which then loses its tail
    const shrink = join(hold.dir, 'shrink.gguf');
    await copyFile(modelA, shrink);
    const s = await rpcServer(hold.mesh!, ['--gguf', shrink]);
    const c = await RawRpcClient.connect(s.address);
    try {
      await c.hello();
      const buf = await c.allocBuffer(BYTES);
      const b = await c.bufferBase(buf.ptr);
      const t = encodeRpcTensor({ type: 1, ne: [256, 256], elementBytes: 2, buffer: buf.ptr, data: b });
      const q = headerA.tensors.find((x) => x.name === NAME)!;
      const before = Buffer.alloc(BYTES, 0x33);
      c.setTensor(t, 0, before);
      await truncate(shrink, q.absoluteOffset + 1000);
      expect(await c.setTensorGguf(t, NAME, 0, BYTES, xxh64(fileBytes))).toBe(GGUF_RESULT.READ_FAILED);
      // nothing was written, not even the 1000 bytes it could read
      expect((await c.getTensor(t, 0, BYTES)).equals(before)).toBe(true);
    } finally {
      c.close();
      await s.stop();
    }
  });

  it('a server without --gguf announces nothing and answers NO_SOURCE', async () => {
    const s = await rpcServer(hold.mesh!);
    const c = await RawRpcClient.connect(s.address);
    try {
      expect((await c.hello()).meshCaps).toBe(0);
      const buf = await c.allocBuffer(BYTES);
      const b = await c.bufferBase(buf.ptr);
      const t = encodeRpcTensor({ type: 1, ne: [256, 256], elementBytes: 2, buffer: buf.ptr, data: b });
      expect(await c.setTensorGguf(t, NAME, 0, BYTES, xxh64(fileBytes))).toBe(GGUF_RESULT.NO_SOURCE);
    } finally {
      c.close();
      await s.stop();
    }
  });

  it('a stock server announces nothing', async () => {
    const s = await rpcServer(hold.stock!);
    const c = await RawRpcClient.connect(s.address);
    try {
      expect(await c.hello()).toEqual({ major: 6, minor: 0, patch: 0, meshCaps: 0 });
    } finally {
      c.close();
      await s.stop();
    }
  });
});
});
