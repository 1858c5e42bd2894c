// Test support for the native/ tests and benchmark: XXH64 as our SET_TENSOR_GGUF patch computes it, a raw
// llama.cpp RPC client that sends hand-made frames, and loopback llama.cpp processes from explicit binaries
// (the tests run patched and stock binaries side by side) through helpers/llama.ts.
import { connect, type Socket } from 'node:net';
import { spawnManaged } from '../src/io/llama/processes.ts';
import { startLlamaServer, startRpcServer, type LlamaServerHandle, type RpcServerHandle } from './helpers/llama.ts';

// ---------------------------------------------------------------------------------------------
// XXH64, seed 0 (the patch's rpc_xxh64). BigInt: slow, but the tests hash at most a few hundred KB.

const M64 = (1n << 64n) - 1n;
const P1 = 11400714785074694791n;
const P2 = 14029467366897019727n;
const P3 = 1609587929392839161n;
const P4 = 9650029242287828579n;
const P5 = 2870177450012600261n;
const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M64;
const round = (acc: bigint, input: bigint): bigint => (rotl((acc + input * P2) & M64, 31n) * P1) & M64;
const merge = (h: bigint, v: bigint): bigint => ((((h ^ round(0n, v)) * P1) & M64) + P4) & M64;

export function xxh64(data: Uint8Array): bigint {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const len = buf.length;
  let p = 0;
  let h: bigint;
  if (len >= 32) {
    let v1 = (P1 + P2) & M64;
    let v2 = P2;
    let v3 = 0n;
    let v4 = (0n - P1) & M64;
    for (; p + 32 <= len; p += 32) {
      v1 = round(v1, buf.readBigUInt64LE(p));
      v2 = round(v2, buf.readBigUInt64LE(p + 8));
      v3 = round(v3, buf.readBigUInt64LE(p + 16));
      v4 = round(v4, buf.readBigUInt64LE(p + 24));
    }
    h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M64;
    h = merge(merge(merge(merge(h, v1), v2), v3), v4);
  } else {
    h = P5;
  }
  h = (h + BigInt(len)) & M64;
  for (; p + 8 <= len; p += 8) {
    h ^= round(0n, buf.readBigUInt64LE(p));
    h = (((rotl(h, 27n) * P1) & M64) + P4) & M64;
  }
  if (p + 4 <= len) {
    h ^= (BigInt(buf.readUInt32LE(p)) * P1) & M64;
    h = (((rotl(h, 23n) * P2) & M64) + P3) & M64;
    p += 4;
  }
  for (; p < len; p++) {
    h ^= (BigInt(buf[p]!) * P5) & M64;
    h = (rotl(h, 11n) * P1) & M64;
  }
  h ^= h >> 33n;
  h = (h * P2) & M64;
  h ^= h >> 29n;
  h = (h * P3) & M64;
  h ^= h >> 32n;
  return h;
}

// ---------------------------------------------------------------------------------------------
// Raw RPC frames (protocol 6.0.0 of the pinned release, plus our command 18)

export const RPC_CMD = {
  ALLOC_BUFFER: 0,
  BUFFER_GET_BASE: 3,
  FREE_BUFFER: 4,
  SET_TENSOR: 6,
  GET_TENSOR: 8,
  GRAPH_COMPUTE: 10,
  HELLO: 14,
  GRAPH_RECOMPUTE: 16,
  SET_TENSOR_GGUF: 18,
} as const;

/** enum ggml_op values of the pinned release used by hand-made graphs. */
export const GGML_OP = { NONE: 0, ADD: 2 } as const;
/** enum ggml_tensor_flag bits of the pinned release. */
export const GGML_TENSOR_FLAG = { INPUT: 1, OUTPUT: 2, COMPUTE: 16 } as const;

/** SET_TENSOR_GGUF answers (enum rpc_gguf_result in the patch). */
export const GGUF_RESULT = {
  NO_SOURCE: 0,
  LOADED: 1,
  UNKNOWN_NAME: 2,
  MISMATCH: 3,
  OUT_OF_RANGE: 4,
  READ_FAILED: 5,
  HASH_DIFFERS: 6,
} as const;

/** For a counting proxy: our command is answered, like SET_TENSOR_HASH. */
export const MESH_RPC_COMMANDS = { 18: { name: 'SET_TENSOR_GGUF', reply: true } } as const;

/** sizeof(rpc_tensor): id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src, view_offs, data, name[64], use_count. */
export const RPC_TENSOR_BYTES = 296;
const GGML_MAX_NAME = 64;

export interface RpcTensorSpec {
  readonly type: number;
  /** Up to 4 dimensions, innermost first. */
  readonly ne: readonly number[];
  /** Bytes per element of ne[0] for unquantized types (F32: 4, F16: 2). */
  readonly elementBytes: number;
  readonly buffer: bigint;
  readonly data: bigint;
  readonly name?: string;
  readonly id?: bigint;
  /** enum ggml_op (GGML_OP); 0 (none) by default. */
  readonly op?: number;
  /** The ids of the source tensors (at most 10). */
  readonly src?: readonly bigint[];
  /** enum ggml_tensor_flag bits (GGML_TENSOR_FLAG); the CPU backend skips a node without COMPUTE. */
  readonly flags?: number;
}

export function encodeRpcTensor(t: RpcTensorSpec): Buffer {
  const b = Buffer.alloc(RPC_TENSOR_BYTES);
  const ne = [...t.ne, 1, 1, 1, 1].slice(0, 4);
  const nb = [t.elementBytes];
  for (let i = 1; i < 4; i++) nb.push(nb[i - 1]! * ne[i - 1]!);
  b.writeBigUInt64LE(t.id ?? 1n, 0);
  b.writeUInt32LE(t.type, 8);
  b.writeBigUInt64LE(t.buffer, 12);
  ne.forEach((v, i) => b.writeUInt32LE(v, 20 + 4 * i));
  nb.forEach((v, i) => b.writeUInt32LE(v, 36 + 4 * i));
  b.writeUInt32LE(t.op ?? 0, 52);
  b.writeInt32LE(t.flags ?? 0, 120);
  (t.src ?? []).forEach((v, i) => b.writeBigUInt64LE(v, 124 + 8 * i));
  b.writeBigUInt64LE(t.data, 220);
  b.write(t.name ?? '', 228, GGML_MAX_NAME - 1, 'latin1');
  return b;
}

export class RpcConnectionClosed extends Error {
  override readonly name = 'RpcConnectionClosed';
}

/** One connection to an rpc-server that sends hand-made frames and reads the replies in order. */
export class RawRpcClient {
  private buf = Buffer.alloc(0);
  private waiters: { need: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }[] = [];
  private closed: Error | null = null;

  private constructor(private readonly sock: Socket) {
    sock.on('data', (chunk: Buffer) => {
      this.buf = Buffer.concat([this.buf, chunk]);
      this.pump();
    });
    const fail = (e?: Error): void => {
      this.closed = new RpcConnectionClosed(`rpc-server closed the connection${e ? `: ${e.message}` : ''}`);
      for (const w of this.waiters.splice(0)) w.reject(this.closed);
    };
    sock.on('close', () => fail());
    sock.on('error', (e) => fail(e));
  }

  static connect(address: string, timeoutMs = 5_000): Promise<RawRpcClient> {
    const [host, port] = address.split(':');
    return new Promise((resolve, reject) => {
      const sock = connect({ host: host!, port: Number(port), noDelay: true });
      const t = setTimeout(() => {
        sock.destroy();
        reject(new Error(`connect to ${address} timed out`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(t);
        resolve(new RawRpcClient(sock));
      });
      sock.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  private pump(): void {
    while (this.waiters.length > 0 && this.buf.length >= this.waiters[0]!.need) {
      const w = this.waiters.shift()!;
      const out = this.buf.subarray(0, w.need);
      this.buf = this.buf.subarray(w.need);
      w.resolve(Buffer.from(out));
    }
  }

  private read(n: number, timeoutMs: number): Promise<Buffer> {
    if (this.closed && this.buf.length < n) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no reply from the rpc-server within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.push({
        need: n,
        resolve: (b) => {
          clearTimeout(t);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
      this.pump();
    });
  }

  send(cmd: number, payload: Buffer): void {
    const head = Buffer.alloc(9);
    head[0] = cmd;
    head.writeBigUInt64LE(BigInt(payload.length), 1);
    this.sock.write(Buffer.concat([head, payload]));
  }

  /** Sends a command and reads its reply's payload (the reply's size prefix is checked against `expect`). */
  async call(cmd: number, payload: Buffer, expect?: number, timeoutMs = 10_000): Promise<Buffer> {
    this.send(cmd, payload);
    const size = Number((await this.read(8, timeoutMs)).readBigUInt64LE(0));
    if (expect !== undefined && size !== expect) throw new Error(`reply of ${size} bytes to command ${cmd}, expected ${expect}`);
    return this.read(size, timeoutMs);
  }

  /** HELLO with zero (TCP-only) caps: version and the padding byte where our patch announces capabilities. */
  async hello(): Promise<{ major: number; minor: number; patch: number; meshCaps: number }> {
    const r = await this.call(RPC_CMD.HELLO, Buffer.alloc(24), 28);
    return { major: r[0]!, minor: r[1]!, patch: r[2]!, meshCaps: r[3]! };
  }

  async allocBuffer(size: number, device = 0): Promise<{ ptr: bigint; size: bigint }> {
    const req = Buffer.alloc(12);
    req.writeUInt32LE(device, 0);
    req.writeBigUInt64LE(BigInt(size), 4);
    const r = await this.call(RPC_CMD.ALLOC_BUFFER, req, 16);
    return { ptr: r.readBigUInt64LE(0), size: r.readBigUInt64LE(8) };
  }

  async bufferBase(ptr: bigint): Promise<bigint> {
    const req = Buffer.alloc(8);
    req.writeBigUInt64LE(ptr);
    return (await this.call(RPC_CMD.BUFFER_GET_BASE, req, 8)).readBigUInt64LE(0);
  }

  async setTensorGguf(tensor: Buffer, name: string, offset: number, size: number, hash: bigint): Promise<number> {
    const req = Buffer.alloc(RPC_TENSOR_BYTES + 24 + GGML_MAX_NAME);
    tensor.copy(req, 0);
    req.writeBigUInt64LE(BigInt(offset), RPC_TENSOR_BYTES);
    req.writeBigUInt64LE(BigInt(size), RPC_TENSOR_BYTES + 8);
    req.writeBigUInt64LE(hash, RPC_TENSOR_BYTES + 16);
    req.write(name, RPC_TENSOR_BYTES + 24, GGML_MAX_NAME - 1, 'latin1');
    return (await this.call(RPC_CMD.SET_TENSOR_GGUF, req, 1))[0]!;
  }

  /** Like setTensorGguf with raw offset/size fields (for values past 2^53). */
  async setTensorGgufRaw(tensor: Buffer, name: string, offset: bigint, size: bigint, hash: bigint): Promise<number> {
    const req = Buffer.alloc(RPC_TENSOR_BYTES + 24 + GGML_MAX_NAME);
    tensor.copy(req, 0);
    req.writeBigUInt64LE(offset, RPC_TENSOR_BYTES);
    req.writeBigUInt64LE(size, RPC_TENSOR_BYTES + 8);
    req.writeBigUInt64LE(hash, RPC_TENSOR_BYTES + 16);
    req.write(name, RPC_TENSOR_BYTES + 24, GGML_MAX_NAME - 1, 'latin1');
    return (await this.call(RPC_CMD.SET_TENSOR_GGUF, req, 1))[0]!;
  }

  async getTensor(tensor: Buffer, offset: number, size: number): Promise<Buffer> {
    const req = Buffer.alloc(RPC_TENSOR_BYTES + 16);
    tensor.copy(req, 0);
    req.writeBigUInt64LE(BigInt(offset), RPC_TENSOR_BYTES);
    req.writeBigUInt64LE(BigInt(size), RPC_TENSOR_BYTES + 8);
    return this.call(RPC_CMD.GET_TENSOR, req, size);
  }

  /** SET_TENSOR (no reply): `data` at `offset` inside `tensor`. */
  setTensor(tensor: Buffer, offset: number, data: Buffer): void {
    const off = Buffer.alloc(8);
    off.writeBigUInt64LE(BigInt(offset));
    this.send(RPC_CMD.SET_TENSOR, Buffer.concat([tensor, off, data]));
  }

  /** FREE_BUFFER (no reply). */
  freeBuffer(ptr: bigint): void {
    const req = Buffer.alloc(8);
    req.writeBigUInt64LE(ptr);
    this.send(RPC_CMD.FREE_BUFFER, req);
  }

  /**
   * GRAPH_COMPUTE (no reply): | device u32 | n_nodes u32 | node ids u64[n_nodes] | n_tensors u32 | rpc_tensor[n_tensors] |.
   * The server keeps the graph for GRAPH_RECOMPUTE.
   */
  graphCompute(nodes: readonly bigint[], tensors: readonly Buffer[], device = 0): void {
    const head = Buffer.alloc(8 + 8 * nodes.length + 4);
    head.writeUInt32LE(device, 0);
    head.writeUInt32LE(nodes.length, 4);
    nodes.forEach((id, i) => head.writeBigUInt64LE(id, 8 + 8 * i));
    head.writeUInt32LE(tensors.length, 8 + 8 * nodes.length);
    this.send(RPC_CMD.GRAPH_COMPUTE, Buffer.concat([head, ...tensors]));
  }

  /** GRAPH_RECOMPUTE (no reply): runs the graph the server stored at the last GRAPH_COMPUTE again. */
  graphRecompute(device = 0): void {
    const req = Buffer.alloc(4);
    req.writeUInt32LE(device);
    this.send(RPC_CMD.GRAPH_RECOMPUTE, req);
  }

  /** Resolves once the server has closed this connection (or rejects after the timeout). */
  closedByServer(timeoutMs = 5_000): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('the rpc-server kept the connection open')), timeoutMs);
      this.sock.once('close', () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  close(): void {
    this.sock.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// Processes from explicit binaries

export type NativeRpcServer = RpcServerHandle;

/** Starts `bin` (a ggml-rpc-server) with `args` on a free loopback port; resolves once it answers HELLO. */
export function startNativeRpcServer(
  bin: string,
  args: readonly string[] = [],
  opts: { threads?: number; env?: Record<string, string>; readyTimeoutMs?: number } = {},
): Promise<NativeRpcServer> {
  return startRpcServer({ binary: bin, extraArgs: args, threads: opts.threads, env: opts.env, readyTimeoutMs: opts.readyTimeoutMs ?? 30_000 });
}

/** Runs `bin` to completion and returns its exit code and output (for start-up refusals). */
export async function runToExit(bin: string, args: readonly string[], timeoutMs = 30_000): Promise<{ code: number | null; output: string }> {
  const proc = spawnManaged({ name: 'run', file: bin, args, env: { GGML_RPC_NO_RDMA: '1' } });
  const t = setTimeout(() => void proc.stop(1_000), timeoutMs);
  await proc.exited;
  clearTimeout(t);
  return { code: proc.exitInfo()?.code ?? null, output: proc.tail().join('\n') };
}

export type NativeLlamaServer = LlamaServerHandle;

/**
 * Starts `bin` (llama-server) for exact comparisons (helpers/llama.ts's defaults), with CPU repacking left
 * as the release has it; `loadMs` is spawn to /health 200.
 */
export function startNativeLlamaServer(
  bin: string,
  opts: { model: string; rpc?: readonly string[]; threads?: number; env?: Record<string, string>; extraArgs?: readonly string[]; readyTimeoutMs?: number },
): Promise<NativeLlamaServer> {
  return startLlamaServer({ ...opts, binary: bin, repack: true, readyTimeoutMs: opts.readyTimeoutMs ?? 180_000 });
}
