// A forced split through two ggml-rpc-servers (stock binaries, loopback, a generated model) gives the
// same greedy tokens as one process alone, and the counting proxies show what each server received.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readGgufHeader, type GgufHeader } from '../src/io/gguf/gguf-reader.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import {
  diffRpcSnapshots,
  formatRpcSnapshot,
  startRpcTrafficProxy,
  type RpcTrafficProxy,
  type RpcTrafficSnapshot,
} from '../src/io/llama/rpc-traffic.ts';
import {
  greedyCompletion,
  llamaBinaries,
  makeTempModel,
  startLlamaServer,
  startRpcServer,
  TINY_MODEL,
  type TempModel,
} from './helpers/llama.ts';

const PROMPT = 'The quick brown fox';
const N_PREDICT = 48;

let model: TempModel;
let header: GgufHeader;
const proxies: RpcTrafficProxy[] = [];

beforeAll(async () => {
  const bins = llamaBinaries(); // fails with how-to-build when the binaries are missing
  console.log(`llama.cpp binaries: ${bins.variant} (${bins.dir})`);
  model = await makeTempModel(TINY_MODEL);
  header = await readGgufHeader(model.path);
});
afterAll(async () => {
  for (const p of proxies) await p.close();
  await stopAll(3_000);
  await model?.remove();
});

const tensorBytes = (name: string) => header.tensors.find((t) => t.name === name)!.bytes;
const setTensorBytes = (s: RpcTrafficSnapshot) =>
  (s.commands.SET_TENSOR?.bytesToServer ?? 0) + (s.commands.SET_TENSOR_HASH?.bytesToServer ?? 0);

describe('forced split through two rpc-servers', () => {
  it('gives the same greedy tokens as solo, and each server got weights and graphs', async () => {
    // Solo on the plain CPU kernels (the helper's default, no repacking), as the rpc-servers compute.
    const solo = await startLlamaServer({ model: model.path });
    const soloOut = await greedyCompletion(solo, PROMPT, N_PREDICT);
    await solo.stop();
    expect(soloOut.tokens).toHaveLength(N_PREDICT);
    expect(new Set(soloOut.tokens).size).toBeGreaterThanOrEqual(8);

    const rpcs = [await startRpcServer({ threads: 1 }), await startRpcServer({ threads: 1 })];
    for (const r of rpcs) proxies.push(await startRpcTrafficProxy({ target: r.address }));
    const [pa, pb] = proxies as [RpcTrafficProxy, RpcTrafficProxy];

    const split = await startLlamaServer({
      model: model.path,
      rpc: [pa.address, pb.address],
      tensorSplit: [1, 1],
      threads: 1,
    });
    const load = [pa.snapshot(), pb.snapshot()];
    const splitOut = await greedyCompletion(split, PROMPT, N_PREDICT);
    const gen = [diffRpcSnapshots(pa.snapshot(), load[0]!), diffRpcSnapshots(pb.snapshot(), load[1]!)];
    await split.stop();

    expect(splitOut.tokens).toEqual(soloOut.tokens);

    // Each server received a share of the weights; together all the repeating layers and the output
    // layer (the token embedding stays with the host: its lookup runs on the CPU).
    const layerBytes = header.tensorBytes - tensorBytes('token_embd.weight');
    for (const s of load) {
      expect(setTensorBytes(s)).toBeGreaterThan(layerBytes / 10);
      expect(s.notes).toEqual([]);
    }
    expect(setTensorBytes(load[0]!) + setTensorBytes(load[1]!)).toBeGreaterThanOrEqual(layerBytes);
    // The output layer sits on the last device, so the last rpc-server computes the logits.
    expect(setTensorBytes(load[1]!)).toBeGreaterThan(tensorBytes('output.weight'));

    // Both servers computed graphs for every generated token and the host waited on both.
    for (const g of gen) {
      expect(g.commands.GRAPH_COMPUTE?.count ?? 0).toBeGreaterThan(0);
      expect((g.commands.GRAPH_COMPUTE?.count ?? 0) + (g.commands.GRAPH_RECOMPUTE?.count ?? 0)).toBeGreaterThanOrEqual(N_PREDICT);
      expect(g.totals.roundTrips).toBeGreaterThanOrEqual(N_PREDICT);
    }
    // The logits (32000 x 4 bytes a token) come back only from the last server.
    const logits = 32000 * 4 * (N_PREDICT - 1);
    expect(gen[1]!.totals.bytesToClient).toBeGreaterThan(logits);
    expect(gen[0]!.totals.bytesToClient).toBeLessThan(logits / 4);

    for (const [i, name] of ['first', 'last'].entries()) {
      console.log(
        `${name} rpc-server, load:\n${formatRpcSnapshot(load[i]!)}\n` +
          `${name} rpc-server, per generated token (${N_PREDICT} tokens, prompt included):\n${formatRpcSnapshot(gen[i]!, N_PREDICT)}`,
      );
    }
  });
});
