// Request survival, the pure part: which OpenAI requests can survive a change of plan under them, how one is
// asked of llama-server's own `/completion` (token ids back, so a cut generation can be continued), what has
// really reached the client, and the body of the continuation after a cut.
//
// Facts this rests on (pinned llama.cpp): only `/completion` returns token ids (`return_tokens`); a partial
// event carries the id of the token just sampled and the text it released, but a token whose bytes end inside
// a UTF-8 character releases nothing and is not reported (its id is lost until the next event's text), and a
// token whose text might begin a stop word is reported with empty text (held back). A prompt given as
// [string, ...ids] is tokenised as the string (with BOS) followed by the ids unchanged.
//
// So the continuation resumes from the last *confirmed* point: every id up to it is known and its text was
// sent. What was sent after that point (bytes of a UTF-8 character completed later, rarely) is generated
// again and skipped, after checking that it is the same text.

/** Requests whose features are plain enough to continue exactly; everything else is proxied as it is. */
export type SurvivalPlan = {
  readonly route: 'chat' | 'completion';
  /** Chat: the messages for `/apply-template`; completion: the prompt string itself. */
  readonly messages?: readonly unknown[];
  readonly prompt?: string;
  /** Extra fields `/apply-template` takes with the messages (chat_template_kwargs). */
  readonly templateFields: Readonly<Record<string, unknown>>;
  readonly stream: boolean;
  readonly includeUsage: boolean;
  /** null: until EOS (or the context ends). */
  readonly maxTokens: number | null;
  /** Sampling and stop fields passed to `/completion` unchanged (the same names there). */
  readonly sampling: Readonly<Record<string, unknown>>;
  readonly model: string | null;
};

/** Fields that change what the answer is made of: such a request is proxied as before (no survival). */
const UNSURVIVABLE = ['tools', 'tool_choice', 'functions', 'function_call', 'response_format', 'logprobs', 'top_logprobs', 'grammar', 'json_schema', 'logit_bias', 'echo', 'suffix', 'best_of', 'n_probs', 'reasoning_format', 'parallel_tool_calls',
  // llama.cpp's extras that add to the answer (token ids, probabilities, timings): passed through as they are.
  'verbose', 'return_tokens', 'post_sampling_probs', 'timings_per_token', 'return_progress'] as const;
/** OpenAI and llama.cpp sampling fields that `/completion` takes under the same name. */
const SAMPLING = ['temperature', 'top_p', 'top_k', 'min_p', 'typical_p', 'seed', 'stop', 'presence_penalty', 'frequency_penalty', 'repeat_penalty', 'repeat_last_n', 'dry_multiplier', 'dry_base', 'dry_allowed_length', 'xtc_probability', 'xtc_threshold', 'mirostat', 'mirostat_tau', 'mirostat_eta', 'ignore_eos', 'samplers', 'top_n_sigma'] as const;

/** The survival plan of a request, or why it is proxied as it is (logged at debug level). */
export function survivalPlan(route: 'chat' | 'completion', body: unknown): SurvivalPlan | { readonly unsurvivable: string } {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return { unsurvivable: 'not a JSON object' };
  const o = body as Record<string, unknown>;
  for (const f of UNSURVIVABLE) if (o[f] !== undefined && o[f] !== null && o[f] !== false) return { unsurvivable: `uses ${f}` };
  if (o['n'] !== undefined && o['n'] !== 1) return { unsurvivable: 'n > 1' };
  const max = o['max_completion_tokens'] ?? o['max_tokens'] ?? o['n_predict'];
  if (max !== undefined && max !== null && !(Number.isSafeInteger(max) && (max as number) >= 0)) return { unsurvivable: 'max_tokens is not a count' };
  const sampling: Record<string, unknown> = {};
  for (const f of SAMPLING) if (o[f] !== undefined) sampling[f] = o[f];
  const streamOptions = o['stream_options'] as { include_usage?: unknown } | undefined;
  const common = {
    stream: o['stream'] === true,
    includeUsage: streamOptions?.include_usage === true,
    maxTokens: max === undefined || max === null ? null : (max as number),
    sampling,
    model: typeof o['model'] === 'string' ? o['model'] : null,
  };
  if (route === 'chat') {
    const messages = o['messages'];
    if (!Array.isArray(messages)) return { unsurvivable: 'messages is not an array' };
    // Text only: images and other parts take another path through llama-server.
    const textOnly = messages.every((m) => typeof (m as { content?: unknown }).content === 'string' || (m as { content?: unknown }).content === undefined);
    if (!textOnly) return { unsurvivable: 'a message has non-text content' };
    const templateFields: Record<string, unknown> = {};
    if (o['chat_template_kwargs'] !== undefined) templateFields['chat_template_kwargs'] = o['chat_template_kwargs'];
    return { route, messages, templateFields, ...common };
  }
  if (typeof o['prompt'] !== 'string') return { unsurvivable: 'the prompt is not one string' };
  return { route, prompt: o['prompt'], templateFields: {}, ...common };
}

/** One partial or final event of llama-server's streamed `/completion`, the fields this uses. */
export interface LlamaEvent {
  readonly content: string;
  readonly tokens: readonly number[];
  readonly stop: boolean;
  /** Tokens sampled so far in this attempt (llama.cpp's n_decoded). */
  readonly tokensPredicted?: number;
  readonly tokensEvaluated?: number;
  /** On the final event: eos | word | limit | none. */
  readonly stopType?: string;
}

export type FinishReason = 'stop' | 'length';

/**
 * What one request has generated across attempts: the ids, the text sent to the client, and the confirmed
 * point a continuation starts from. Attempts feed it their events in order; `begin` starts an attempt.
 */
export class Generation {
  /** Every id of this request's generation, known in order (past the confirmed point: of this attempt). */
  private ids: number[] = [];
  /** Text sent to the client. */
  sentText = '';
  /** The confirmed point: ids known and text sent up to here. */
  private confirmedIds = 0;
  private confirmedText = 0;
  /** This attempt: where its tokens start in `ids`, and text of a continuation still to match and skip. */
  private attemptBase = 0;
  private toSkip = '';
  private idsComplete = true;
  promptTokens: number | null = null;
  finish: FinishReason | null = null;
  attempts = 0;

  constructor(readonly plan: SurvivalPlan) {}

  /** Tokens generated and confirmed (what a continuation counts against max_tokens). */
  get generated(): number {
    return this.confirmedIds;
  }

  get completionTokens(): number {
    return this.ids.length;
  }

  /** The `/completion` body of the next attempt: the prompt (string first, so it keeps its BOS), then the confirmed ids. */
  nextRequest(promptText: string): Record<string, unknown> {
    this.attempts++;
    this.ids = this.ids.slice(0, this.confirmedIds);
    this.attemptBase = this.confirmedIds;
    this.toSkip = this.sentText.slice(this.confirmedText);
    this.idsComplete = true;
    const remaining = this.plan.maxTokens === null ? -1 : Math.max(0, this.plan.maxTokens - this.confirmedIds);
    return {
      ...this.plan.sampling,
      prompt: this.confirmedIds === 0 ? promptText : [promptText, ...this.ids],
      n_predict: remaining,
      stream: true,
      return_tokens: true,
      cache_prompt: true,
    };
  }

  /**
   * One event of the current attempt: returns the text to send the client now (possibly ''), or throws a
   * ContinuationMismatch when a continuation regenerated text different from what was already sent.
   */
  take(event: LlamaEvent): string {
    if (this.attempts === 1 && this.promptTokens === null && event.tokensEvaluated !== undefined) this.promptTokens = event.tokensEvaluated;
    this.ids.push(...event.tokens);
    if (event.tokensPredicted !== undefined && this.attemptBase + event.tokensPredicted !== this.ids.length) this.idsComplete = false;
    let text = event.content;
    if (this.toSkip.length > 0 && text.length > 0) {
      const n = Math.min(this.toSkip.length, text.length);
      if (text.slice(0, n) !== this.toSkip.slice(0, n)) throw new ContinuationMismatch(this.toSkip.slice(0, n), text.slice(0, n));
      this.toSkip = this.toSkip.slice(n);
      text = text.slice(n);
    }
    this.sentText += text;
    // Confirmed: every id of this attempt known, the text caught up (nothing held back), nothing left to skip.
    if (this.idsComplete && event.content.length > 0 && this.toSkip.length === 0) {
      this.confirmedIds = this.ids.length;
      this.confirmedText = this.sentText.length;
    }
    if (event.stop) {
      this.finish = event.stopType === 'limit' ? 'length' : 'stop';
      this.confirmedIds = this.ids.length;
      this.confirmedText = this.sentText.length;
    }
    return text;
  }

  /** Whether the generation already reached max_tokens (a cut right at the end needs no continuation). */
  get exhausted(): boolean {
    return this.plan.maxTokens !== null && this.confirmedIds >= this.plan.maxTokens;
  }
}

export class ContinuationMismatch extends Error {
  override name = 'ContinuationMismatch';
  constructor(
    readonly sent: string,
    readonly regenerated: string,
  ) {
    super(`the continuation regenerated ${JSON.stringify(regenerated.slice(0, 40))} where ${JSON.stringify(sent.slice(0, 40))} was already sent`);
  }
}

/** Parses one `data:` payload of llama-server's `/completion` stream; null when it is not one. */
export function parseLlamaEvent(data: string): LlamaEvent | null {
  let v: unknown;
  try {
    v = JSON.parse(data);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null) return null;
  const o = v as Record<string, unknown>;
  if (typeof o['content'] !== 'string' || typeof o['stop'] !== 'boolean') return null;
  const tokens = Array.isArray(o['tokens']) ? (o['tokens'] as unknown[]).filter((t): t is number => Number.isSafeInteger(t)) : [];
  return {
    content: o['content'],
    tokens,
    stop: o['stop'],
    ...(Number.isSafeInteger(o['tokens_predicted']) ? { tokensPredicted: o['tokens_predicted'] as number } : {}),
    ...(Number.isSafeInteger(o['tokens_evaluated']) ? { tokensEvaluated: o['tokens_evaluated'] as number } : {}),
    ...(typeof o['stop_type'] === 'string' ? { stopType: o['stop_type'] } : {}),
  };
}

// ---- the OpenAI shapes the owner answers with ------------------------------------------------------------

export interface AnswerIds {
  readonly id: string;
  readonly created: number;
  readonly model: string;
}

/** One streamed chunk: `text` as the delta (chat) or the text (completion); `finish` on the last one. */
export function openaiChunk(plan: SurvivalPlan, ids: AnswerIds, text: string | null, finish: FinishReason | null, first = false): Record<string, unknown> {
  if (plan.route === 'chat') {
    const delta: Record<string, unknown> = first ? { role: 'assistant', content: text ?? '' } : text === null ? {} : { content: text };
    return { id: ids.id, object: 'chat.completion.chunk', created: ids.created, model: ids.model, choices: [{ index: 0, delta, finish_reason: finish }] };
  }
  return { id: ids.id, object: 'text_completion', created: ids.created, model: ids.model, choices: [{ index: 0, text: text ?? '', logprobs: null, finish_reason: finish }] };
}

export function usageOf(g: Generation): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  const prompt = g.promptTokens ?? 0;
  return { prompt_tokens: prompt, completion_tokens: g.completionTokens, total_tokens: prompt + g.completionTokens };
}

/** The whole answer of a non-streamed request. */
export function openaiAnswer(g: Generation, ids: AnswerIds): Record<string, unknown> {
  const choice =
    g.plan.route === 'chat'
      ? { index: 0, message: { role: 'assistant', content: g.sentText }, finish_reason: g.finish ?? 'stop' }
      : { index: 0, text: g.sentText, logprobs: null, finish_reason: g.finish ?? 'stop' };
  return { id: ids.id, object: g.plan.route === 'chat' ? 'chat.completion' : 'text_completion', created: ids.created, model: ids.model, choices: [choice], usage: usageOf(g) };
}
