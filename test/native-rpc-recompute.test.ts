// Patch 0004 (rpc-recompute-uaf, advisory GHSA-2phh-px2f-2qmx, upstream llama.cpp PR #24292): the rpc-server
// keeps the last computed graph per device for GRAPH_RECOMPUTE, and that graph points into the client's
// buffers. Stock: FREE_BUFFER leaves it in place, so a GRAPH_RECOMPUTE after it computes through freed memory.
// Patched: freeing a buffer drops the graphs that use it, and a GRAPH_RECOMPUTE with no graph is refused
// (the connection closes), with the server alive for the next client. Real rpc-servers, hand-made frames.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { ensureLlamaBinaries, type LlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { GGML_OP, GGML_TENSOR_FLAG, RawRpcClient, encodeRpcTensor, startNativeRpcServer, type NativeRpcServer } from './native-support.ts';


const N = 1024; // F32 elements per tensor
const TENSOR_BYTES = 4 * N;
// Over glibc's largest mmap threshold (32 MiB), so the CPU backend's buffer is its own mapping and
// FREE_BUFFER unmaps it: touching it afterwards faults instead of silently reading reused heap.
const BUFFER_BYTES = 64 * 1024 * 1024;

const hold: { mesh?: LlamaBinaries; stock?: LlamaBinaries } = {};
const children: NativeRpcServer[] = [];

async function rpcServer(bins: LlamaBinaries): Promise<NativeRpcServer> {
  const s = await startNativeRpcServer(bins.rpcServer);
  children.push(s);
  return s;
}

const f32 = (v: number): Buffer => {
  const b = Buffer.alloc(TENSOR_BYTES);
  for (let i = 0; i < N; i++) b.writeFloatLE(v, 4 * i);
  return b;
};

/** c = a + b on the server's device 0, all three in one buffer: what GRAPH_RECOMPUTE replays. */
interface AddGraph {
  readonly ptr: bigint;
  readonly a: Buffer;
  readonly b: Buffer;
  readonly c: Buffer;
}

async function computeAdd(client: RawRpcClient, av: number, bv: number): Promise<AddGraph> {
  const buf = await client.allocBuffer(BUFFER_BYTES);
  expect(buf.ptr).not.toBe(0n);
  const base = await client.bufferBase(buf.ptr);
  const t = (id: bigint, at: number, extra: { op?: number; src?: bigint[]; flags?: number } = {}): Buffer =>
    encodeRpcTensor({ id, type: 0, ne: [N], elementBytes: 4, buffer: buf.ptr, data: base + BigInt(at), name: `t${id}`, ...extra });
  const a = t(0xa1n, 0);
  const b = t(0xb2n, 4096);
  const c = t(0xc3n, 8192, { op: GGML_OP.ADD, src: [0xa1n, 0xb2n], flags: GGML_TENSOR_FLAG.COMPUTE | GGML_TENSOR_FLAG.OUTPUT });
  client.setTensor(a, 0, f32(av));
  client.setTensor(b, 0, f32(bv));
  client.graphCompute([0xc3n], [a, b, c]);
  expect((await client.getTensor(c, 0, TENSOR_BYTES)).equals(f32(av + bv))).toBe(true);
  return { ptr: buf.ptr, a, b, c };
}

// Missing binaries (mesh or stock) are failures, not skips: a skipped suite would prove nothing.
describe('native: GRAPH_RECOMPUTE after FREE_BUFFER (GHSA-2phh-px2f-2qmx)', () => {
  beforeAll(async () => {
    hold.mesh = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => console.log(l) });
    hold.stock = await ensureLlamaBinaries({ variant: 'stock', onLine: (l) => console.log(l) });
  }, 40 * 60_000);

  afterAll(async () => {
    for (const c of children.splice(0)) await c.stop();
  });

  it('the build carries the fix', () => {
    expect(hold.mesh!.patches).toContain('rpc-recompute-uaf/1');
  });

  it('recomputes the stored graph while its buffers live, even after another buffer is freed', async () => {
    const s = await rpcServer(hold.mesh!);
    const client = await RawRpcClient.connect(s.address);
    try {
      await client.hello();
      const g = await computeAdd(client, 1, 2);
      client.setTensor(g.a, 0, f32(10));
      client.graphRecompute();
      expect((await client.getTensor(g.c, 0, TENSOR_BYTES)).equals(f32(12))).toBe(true);
      // a buffer the graph does not use: the graph stays
      const other = await client.allocBuffer(4096);
      client.freeBuffer(other.ptr);
      client.setTensor(g.b, 0, f32(20));
      client.graphRecompute();
      expect((await client.getTensor(g.c, 0, TENSOR_BYTES)).equals(f32(30))).toBe(true);
    } finally {
      client.close();
      await s.stop();
    }
  });

  it('ALLOC_BUFFER, GRAPH_COMPUTE, FREE_BUFFER, GRAPH_RECOMPUTE: refused, nothing freed is touched, the server serves on', async () => {
    const s = await rpcServer(hold.mesh!);
    const client = await RawRpcClient.connect(s.address);
    const g = await (async () => {
      await client.hello();
      return computeAdd(client, 1, 2);
    })();
    client.freeBuffer(g.ptr);
    client.graphRecompute();
    // the refusal: the server closes this connection (GRAPH_RECOMPUTE has no reply to carry an error)
    await client.closedByServer(10_000);
    client.close();
    // alive, and it says why in its log
    await new Promise((r) => setTimeout(r, 300));
    expect(s.process.exitInfo()).toBeNull();
    expect(s.process.tail().join('\n')).toMatch(/no stored graph to recompute/);
    // the next client gets a working server: HELLO, and a graph computed and recomputed
    const next = await RawRpcClient.connect(s.address);
    try {
      expect((await next.hello()).major).toBe(6);
      const g2 = await computeAdd(next, 3, 4);
      next.setTensor(g2.a, 0, f32(5));
      next.graphRecompute();
      expect((await next.getTensor(g2.c, 0, TENSOR_BYTES)).equals(f32(9))).toBe(true);
    } finally {
      next.close();
    }
    expect(s.process.exitInfo()).toBeNull();
    await s.stop();
  });

  it('GRAPH_RECOMPUTE before any GRAPH_COMPUTE is refused the same way', async () => {
    const s = await rpcServer(hold.mesh!);
    const client = await RawRpcClient.connect(s.address);
    await client.hello();
    client.graphRecompute();
    await client.closedByServer(10_000);
    client.close();
    const next = await RawRpcClient.connect(s.address);
    try {
      expect((await next.hello()).major).toBe(6);
    } finally {
      next.close();
    }
    expect(s.process.exitInfo()).toBeNull();
    await s.stop();
  });

  it('without the fix (the stock build of the same release), the same frames kill the rpc-server', async () => {
    const s = await rpcServer(hold.stock!);
    const client = await RawRpcClient.connect(s.address);
    try {
      await client.hello();
      const g = await computeAdd(client, 1, 2);
      client.freeBuffer(g.ptr);
      client.graphRecompute(); // computes c = a + b through the unmapped buffer
      const exit = await Promise.race([s.exited, new Promise<null>((r) => setTimeout(() => r(null), 10_000))]);
      expect(exit).not.toBeNull();
      expect(exit!.requested).toBe(false);
      console.log(`stock rpc-server after FREE_BUFFER + GRAPH_RECOMPUTE: exit code ${exit!.code}, signal ${exit!.signal}`);
      expect(exit!.signal ?? exit!.code).not.toBe(0);
    } finally {
      client.close();
      await s.stop();
    }
  });
});
