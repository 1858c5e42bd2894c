// The RPC-counting proxy: the parser on synthetic streams cut anywhere, the proxy's byte-for-byte
// forwarding, and a real ggml-rpc-server session driven by llama-server through the proxy.
import { createServer, connect, type Server, type Socket } from 'node:net';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readGgufHeader } from '../src/io/gguf/gguf-reader.ts';
import {
  RPC_COMMANDS,
  RpcStreamParser,
  RpcTrafficCounter,
  diffRpcSnapshots,
  formatRpcSnapshot,
  rpcHello,
  startRpcTrafficProxy,
  type RpcTrafficProxy,
} from '../src/io/llama/rpc-traffic.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import {
  greedyCompletion,
  llamaBinaries,
  makeTempModel,
  startLlamaServer,
  startRpcServer,
  type TempModel,
} from './helpers/llama.ts';

const req = (cmd: number, payload: number | Buffer): Buffer => {
  const p = typeof payload === 'number' ? Buffer.alloc(payload, 0xab) : payload;
  const h = Buffer.alloc(9);
  h[0] = cmd;
  h.writeBigUInt64LE(BigInt(p.length), 1);
  return Buffer.concat([h, p]);
};
const rsp = (size: number): Buffer => {
  const h = Buffer.alloc(8);
  h.writeBigUInt64LE(BigInt(size));
  return Buffer.concat([h, Buffer.alloc(size, 0xcd)]);
};

/** One conversation: [direction, bytes] in the order a stock client and server produce them. */
const conversation: readonly (readonly ['c' | 's', Buffer])[] = [
  ['c', req(14, Buffer.alloc(24))], // HELLO with zero caps (plain TCP)
  ['s', rsp(28)],
  ['c', req(15, 0)], // DEVICE_COUNT
  ['s', rsp(4)],
  ['c', req(13, 4 + 336 * 11)], // GET_ALLOC_SIZE
  ['s', rsp(8)],
  ['c', req(0, 12)], // ALLOC_BUFFER
  ['s', rsp(16)],
  ['c', req(6, 336 + 16 + 100_000)], // SET_TENSOR: fire and forget
  ['c', req(6, 336 + 16 + 5)],
  ['c', req(10, 2000)], // GRAPH_COMPUTE: fire and forget
  ['c', req(8, 336 + 16)], // GET_TENSOR
  ['s', rsp(4096)],
  ['c', req(4, 8)], // FREE_BUFFER: no reply in this release
];

function feed(parser: RpcStreamParser, cuts: (dir: 'c' | 's', b: Buffer) => Buffer[]): void {
  let t = 0;
  for (const [dir, bytes] of conversation) {
    for (const piece of cuts(dir, bytes)) {
      t += 1;
      if (dir === 'c') parser.fromClient(piece, t);
      else parser.fromServer(piece, t);
    }
  }
}

describe('RpcStreamParser', () => {
  it('counts commands, bytes each way and blocking round trips', () => {
    const counter = new RpcTrafficCounter();
    feed(new RpcStreamParser(counter), (_d, b) => [b]);
    const s = counter.snapshot();
    expect(s.commands.HELLO).toMatchObject({ count: 1, bytesToServer: 9 + 24, bytesToClient: 8 + 28, roundTrips: 1 });
    expect(s.commands.DEVICE_COUNT).toMatchObject({ count: 1, bytesToServer: 9, bytesToClient: 12, roundTrips: 1 });
    expect(s.commands.SET_TENSOR).toMatchObject({ count: 2, bytesToServer: 2 * (9 + 352) + 100_005, bytesToClient: 0, roundTrips: 0 });
    expect(s.commands.GRAPH_COMPUTE).toMatchObject({ count: 1, bytesToClient: 0, roundTrips: 0 });
    expect(s.commands.GET_TENSOR).toMatchObject({ count: 1, bytesToClient: 8 + 4096, roundTrips: 1 });
    expect(s.commands.FREE_BUFFER).toMatchObject({ count: 1, roundTrips: 0 });
    expect(s.totals.roundTrips).toBe(5);
    expect(s.totals.count).toBe(9);
    const total = conversation.reduce((a, [, b]) => a + b.length, 0);
    expect(s.totals.bytesToServer + s.totals.bytesToClient).toBe(total);
    expect(s.rawBytesToServer).toBe(s.totals.bytesToServer);
    expect(s.rawBytesToClient).toBe(s.totals.bytesToClient);
    expect(s.notes).toEqual([]);
  });

  it('counts the same whatever the chunking (TCP may cut anywhere)', () => {
    const whole = new RpcTrafficCounter();
    feed(new RpcStreamParser(whole), (_d, b) => [b]);
    const expected = whole.snapshot();
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 50 }), (sizes) => {
        const counter = new RpcTrafficCounter();
        let k = 0;
        feed(new RpcStreamParser(counter), (_d, b) => {
          const pieces: Buffer[] = [];
          for (let i = 0; i < b.length; ) {
            const n = sizes[k++ % sizes.length]!;
            pieces.push(b.subarray(i, i + n));
            i += n;
          }
          return pieces;
        });
        const got = counter.snapshot();
        for (const [name, c] of Object.entries(expected.commands)) {
          expect({ name, ...got.commands[name], waitMs: 0 }).toEqual({ name, ...c, waitMs: 0 });
        }
      }),
      { numRuns: 300 },
    );
  });

  it('does not count a reply as blocking when the client sent more before it came', () => {
    const counter = new RpcTrafficCounter();
    const p = new RpcStreamParser(counter);
    p.fromClient(req(13, 8), 0); // GET_ALLOC_SIZE
    p.fromClient(req(10, 8), 1); // pipelined GRAPH_COMPUTE
    p.fromServer(rsp(8), 2);
    p.fromClient(req(1, 4), 3); // GET_ALIGNMENT, answered before anything else
    p.fromServer(rsp(8), 7);
    const s = counter.snapshot();
    expect(s.commands.GET_ALLOC_SIZE!.roundTrips).toBe(0);
    expect(s.commands.GET_ALIGNMENT!.roundTrips).toBe(1);
    expect(s.commands.GET_ALIGNMENT!.waitMs).toBe(4);
  });

  it('notes an unknown command or an unasked reply and stops counting that stream, never throws', () => {
    const counter = new RpcTrafficCounter();
    const p = new RpcStreamParser(counter);
    p.fromClient(req(99, 3), 0);
    p.fromClient(req(14, 24), 1);
    expect(counter.snapshot().notes[0]).toMatch(/unknown RPC command 99/);
    expect(counter.snapshot().commands.HELLO).toBeUndefined();
    expect(counter.snapshot().rawBytesToServer).toBe(12 + 33);

    const c2 = new RpcTrafficCounter();
    new RpcStreamParser(c2).fromServer(rsp(4), 0);
    expect(c2.snapshot().notes[0]).toMatch(/no request waiting/);
  });

  it('counts a command of a patched server when told about it', () => {
    const counter = new RpcTrafficCounter();
    const p = new RpcStreamParser(counter, { ...RPC_COMMANDS, 19: { name: 'SOMETHING_NEW', reply: true } });
    p.fromClient(req(18, 40), 0); // our SET_TENSOR_GGUF, known by default
    p.fromServer(rsp(1), 1);
    p.fromClient(req(19, 40), 2);
    p.fromServer(rsp(1), 3);
    expect(counter.snapshot().commands.SET_TENSOR_GGUF).toMatchObject({ count: 1, roundTrips: 1 });
    expect(counter.snapshot().commands.SOMETHING_NEW).toMatchObject({ count: 1, roundTrips: 1 });
  });

  it('flags an RDMA offer in HELLO (the traffic would leave the proxied TCP path)', () => {
    const counter = new RpcTrafficCounter();
    const caps = Buffer.alloc(24);
    caps[3] = 7;
    new RpcStreamParser(counter).fromClient(req(14, caps), 0);
    expect(counter.snapshot().notes.join()).toMatch(/RDMA/);
  });

  it('diffs snapshots and formats a table', () => {
    const counter = new RpcTrafficCounter();
    const p = new RpcStreamParser(counter);
    p.fromClient(req(14, 24), 0);
    p.fromServer(rsp(28), 1);
    const before = counter.snapshot();
    p.fromClient(req(10, 100), 2);
    p.fromClient(req(10, 100), 3);
    const d = diffRpcSnapshots(counter.snapshot(), before);
    expect(Object.keys(d.commands)).toEqual(['GRAPH_COMPUTE']);
    expect(d.totals).toMatchObject({ count: 2, bytesToServer: 218, roundTrips: 0 });
    expect(formatRpcSnapshot(d, 2)).toMatch(/GRAPH_COMPUTE\s+1\s+0\s+109\s+0/);
    expect(formatRpcSnapshot(d, 3)).toMatch(/GRAPH_COMPUTE\s+0\.67\s+0\s+72\.67\s+0/);
  });
});

describe('proxy forwarding (fake upstream)', () => {
  let upstream: Server;
  let received: Buffer[] = [];
  let upstreamSocket: Socket | null = null;
  let proxy: RpcTrafficProxy;

  beforeAll(async () => {
    upstream = createServer((s) => {
      upstreamSocket = s;
      s.on('data', (b) => received.push(b));
    });
    await new Promise<void>((r) => upstream.listen(0, '127.0.0.1', r));
    const port = (upstream.address() as { port: number }).port;
    proxy = await startRpcTrafficProxy({ target: `127.0.0.1:${port}` });
  });
  afterAll(async () => {
    await proxy.close();
    await new Promise((r) => upstream.close(r));
  });

  it('forwards a partial frame at once instead of waiting for the rest', async () => {
    received = [];
    const client = connect({ host: '127.0.0.1', port: proxy.port });
    await new Promise((r) => client.once('connect', r));
    const frame = req(6, 1000);
    client.write(frame.subarray(0, 5)); // half a header: a frame-buffering proxy would hold it
    await until(() => Buffer.concat(received).length === 5);
    client.write(frame.subarray(5));
    await until(() => Buffer.concat(received).length === frame.length);
    expect(Buffer.concat(received).equals(frame)).toBe(true);

    const answers: Buffer[] = [];
    client.on('data', (b) => answers.push(b));
    client.write(req(15, 0));
    await until(() => Buffer.concat(received).length === frame.length + 9);
    upstreamSocket!.write(rsp(4));
    await until(() => Buffer.concat(answers).length === 12);
    const s = proxy.snapshot();
    expect(s.commands.SET_TENSOR).toMatchObject({ count: 1, bytesToServer: 1009 });
    expect(s.commands.DEVICE_COUNT).toMatchObject({ count: 1, roundTrips: 1, bytesToClient: 12 });
    expect(s.connectionsOpened).toBe(1);
    proxy.reset();
    expect(proxy.snapshot().totals.count).toBe(0);
    client.destroy();
  });

  it('rejects a malformed target', async () => {
    await expect(startRpcTrafficProxy({ target: 'no-port' })).rejects.toThrow(/host:port/);
  });
});

async function until(cond: () => boolean, timeoutMs = 5_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('a real ggml-rpc-server session through the proxy', () => {
  let model: TempModel;
  beforeAll(async () => {
    llamaBinaries(); // fails with how-to-build when the binaries are missing
    model = await makeTempModel();
  });
  afterAll(async () => {
    await stopAll(3_000);
    await model?.remove();
  });

  it('answers HELLO through the proxy with protocol 6', async () => {
    const rpc = await startRpcServer();
    const proxy = await startRpcTrafficProxy({ target: rpc.address });
    try {
      expect(await rpcHello(proxy.address)).toMatchObject({ major: 6, minor: 0, patch: 0 });
      await until(() => (proxy.snapshot().commands.HELLO?.roundTrips ?? 0) === 1);
      expect(proxy.snapshot().commands.HELLO).toMatchObject({ count: 1, bytesToServer: 33, bytesToClient: 36 });
    } finally {
      await proxy.close();
      await rpc.stop();
    }
  });

  it('counts a model load and generation: weights as SET_TENSOR, tokens as GRAPH_COMPUTE', async () => {
    const rpc = await startRpcServer();
    const proxy = await startRpcTrafficProxy({ target: rpc.address });
    try {
      const server = await startLlamaServer({ model: model.path, rpc: [proxy.address] });
      const load = proxy.snapshot();
      const header = await readGgufHeader(model.path);

      // Every weight but the token embedding (the host looks tokens up on its CPU) went to the only
      // device, as bytes (SET_TENSOR_HASH is tried only for tensors over 10 MiB).
      const set = load.commands.SET_TENSOR!;
      const offloaded = header.tensorBytes - header.tensors.find((t) => t.name === 'token_embd.weight')!.bytes;
      expect(set.bytesToServer).toBeGreaterThanOrEqual(offloaded);
      expect(set.bytesToServer).toBeLessThan(offloaded * 1.1 + 1_000_000);
      // llama-server opens several connections while it loads (devices are probed before the model),
      // each beginning with HELLO.
      expect(load.connectionsOpened).toBeGreaterThanOrEqual(1);
      expect(load.commands.HELLO).toMatchObject({ count: load.connectionsOpened, roundTrips: load.connectionsOpened });
      expect(load.commands.ALLOC_BUFFER!.roundTrips).toBeGreaterThan(0);
      expect(load.rawBytesToServer).toBe(load.totals.bytesToServer);
      expect(load.rawBytesToClient).toBe(load.totals.bytesToClient);
      expect(load.notes).toEqual([]);

      const before = proxy.snapshot();
      const n = 32;
      const out = await greedyCompletion(server, 'The mesh', n);
      const gen = diffRpcSnapshots(proxy.snapshot(), before);
      expect(out.tokens.length).toBe(n);
      // One graph per generated token at least (plus the prompt's).
      expect(gen.commands.GRAPH_COMPUTE!.count + (gen.commands.GRAPH_RECOMPUTE?.count ?? 0)).toBeGreaterThanOrEqual(n);
      // The host waits on this server every token: for the logits (GET_TENSOR) at least.
      expect(gen.totals.roundTrips).toBeGreaterThanOrEqual(n);
      expect(gen.commands.SET_TENSOR?.bytesToServer ?? 0).toBeLessThan(header.tensorBytes / 10);
      console.log(`load:\n${formatRpcSnapshot(load)}\nper generated token (${n}):\n${formatRpcSnapshot(gen, n)}`);
      await server.stop();
    } finally {
      await proxy.close();
      await rpc.stop();
    }
  });
});
