// Generated models against the real llama.cpp: llama-server loads them, tokenizes with the copied
// tokenizer, and greedy generation is varied (not one token repeated), for each weight type.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stopAll } from '../src/io/llama/processes.ts';
import { greedyCompletion, llamaBinaries, makeTempModel, startLlamaServer, type TempModel } from './helpers/llama.ts';

const models: TempModel[] = [];
beforeAll(() => {
  llamaBinaries(); // fails with how-to-build when the binaries are missing
});
afterAll(async () => {
  await stopAll(3_000);
  for (const m of models) await m.remove();
});

describe('llama.cpp loads generated models', () => {
  for (const type of ['f16', 'q8_0', 'f32'] as const) {
    it(`serves a ${type} model: real tokenizer, 32 greedy tokens, at least 8 distinct`, async () => {
      const model = await makeTempModel({ layers: 4, embd: 64, ff: 192, type, seed: 11 });
      models.push(model);
      const server = await startLlamaServer({ model: model.path });
      try {
        // The llama-spm vocab's ids for "Hello world": the tokenizer came across intact.
        const tok = await fetch(`${server.url}/tokenize`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', ...server.authHeaders },
          body: JSON.stringify({ content: 'Hello world' }),
        });
        expect(((await tok.json()) as { tokens: number[] }).tokens).toEqual([15043, 3186]);

        const out = await greedyCompletion(server, 'Once upon a time', 32);
        expect(out.tokens).toHaveLength(32);
        expect(new Set(out.tokens).size).toBeGreaterThanOrEqual(8);
        // Greedy is deterministic: the same request gives the same tokens.
        expect((await greedyCompletion(server, 'Once upon a time', 32)).tokens).toEqual(out.tokens);
      } finally {
        await server.stop();
      }
    });
  }
});
