// The pure part of request survival (src/machines/continuation.ts): which requests can be continued, how a
// continuation is asked, and what counts as confirmed when llama.cpp holds text back (a UTF-8 character split
// across tokens, a possible stop word).
import { describe, expect, it } from 'vitest';
import { ContinuationMismatch, Generation, openaiAnswer, parseLlamaEvent, survivalPlan, type LlamaEvent, type SurvivalPlan } from '../src/machines/continuation.ts';

const plan = (over: Record<string, unknown> = {}) => {
  const p = survivalPlan('chat', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 10, temperature: 0, stream: true, ...over });
  if ('unsurvivable' in p) throw new Error(p.unsurvivable);
  return p as SurvivalPlan;
};
const ev = (content: string, tokens: number[], tokensPredicted: number, stop = false, stopType?: string): LlamaEvent => ({ content, tokens, stop, tokensPredicted, ...(stopType ? { stopType } : {}) });

describe('which requests survive', () => {
  it('plain chat and completions do; tools, n > 1, response_format, logprobs, llama extras and non-text content do not', () => {
    expect('unsurvivable' in survivalPlan('chat', { messages: [{ role: 'user', content: 'x' }] })).toBe(false);
    expect('unsurvivable' in survivalPlan('completion', { prompt: 'x', max_tokens: 3 })).toBe(false);
    for (const extra of [{ tools: [{}] }, { n: 2 }, { response_format: { type: 'json_object' } }, { logprobs: true }, { verbose: true }, { return_tokens: true }]) {
      expect(survivalPlan('chat', { messages: [{ role: 'user', content: 'x' }], ...extra })).toHaveProperty('unsurvivable');
    }
    expect(survivalPlan('chat', { messages: [{ role: 'user', content: [{ type: 'image_url' }] }] })).toHaveProperty('unsurvivable');
    expect(survivalPlan('completion', { prompt: ['a', 'b'] })).toHaveProperty('unsurvivable');
  });

  it('passes sampling and stop fields to /completion under their names, max_tokens as n_predict', () => {
    const g = new Generation(plan({ seed: 7, stop: ['END'], top_k: 1 }));
    expect(g.nextRequest('PROMPT')).toMatchObject({ prompt: 'PROMPT', n_predict: 10, seed: 7, stop: ['END'], top_k: 1, temperature: 0, stream: true, return_tokens: true });
  });
});

describe('continuing a cut generation', () => {
  it('re-submits the prompt string then the confirmed ids, with the remaining max_tokens', () => {
    const g = new Generation(plan());
    g.nextRequest('P');
    expect(g.take(ev('a', [1], 1))).toBe('a');
    expect(g.take(ev('b', [2], 2))).toBe('b');
    expect(g.generated).toBe(2);
    expect(g.nextRequest('P')).toMatchObject({ prompt: ['P', 1, 2], n_predict: 8 });
    expect(g.take(ev('c', [3], 1))).toBe('c');
    expect(g.take(ev('', [], 8, true, 'limit'))).toBe('');
    expect(g.finish).toBe('length');
    expect(g.sentText).toBe('abc');
    expect(openaiAnswer(g, { id: 'x', created: 1, model: 'm' })).toMatchObject({ choices: [{ message: { content: 'abc' }, finish_reason: 'length' }] });
  });

  it('a token held back as a possible stop word is not confirmed: the continuation generates it again', () => {
    const g = new Generation(plan());
    g.nextRequest('P');
    g.take(ev('a', [1], 1));
    g.take(ev('', [2], 2)); // "EN" of a stop word "END", held back
    expect(g.generated).toBe(1);
    expect(g.nextRequest('P')).toMatchObject({ prompt: ['P', 1], n_predict: 9 });
  });

  it('a UTF-8 character split over tokens: the lost id makes the point unconfirmed; the continuation skips what was sent, checking it', () => {
    const g = new Generation(plan());
    g.nextRequest('P');
    g.take(ev('a', [1], 1));
    // Token 2 ended inside a character: no event; token 3 completes it, and only its id is reported.
    expect(g.take(ev('é', [3], 3))).toBe('é');
    expect(g.take(ev('b', [4], 4))).toBe('b');
    expect(g.generated).toBe(1); // ids are incomplete since token 2: nothing after 'a' is confirmed
    expect(g.nextRequest('P')).toMatchObject({ prompt: ['P', 1], n_predict: 9 });
    // The same text again is skipped, then new text flows.
    expect(g.take(ev('é', [3], 2))).toBe('');
    expect(g.take(ev('b', [4], 3))).toBe('');
    expect(g.take(ev('c', [5], 4))).toBe('c');
    expect(g.sentText).toBe('aébc');
    // Different text where text was already sent: a mismatch, never garbled output.
    const h = new Generation(plan());
    h.nextRequest('P');
    h.take(ev('a', [1], 1));
    h.take(ev('é', [3], 3));
    h.nextRequest('P');
    expect(() => h.take(ev('x', [9], 2))).toThrow(ContinuationMismatch);
  });

  it('parses llama-server events and refuses what is not one', () => {
    expect(parseLlamaEvent('{"content":"a","tokens":[5],"stop":false,"tokens_predicted":1}')).toEqual({ content: 'a', tokens: [5], stop: false, tokensPredicted: 1 });
    expect(parseLlamaEvent('{"error":{"message":"x"}}')).toBeNull();
    expect(parseLlamaEvent('not json')).toBeNull();
  });
});
