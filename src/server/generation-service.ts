import { randomUUID } from 'node:crypto';
import { promptTooManyChars } from '../errors.ts';
import type { GenerationRequest, GenerationResult, TokenEvent } from '../engine/generation.ts';
import type { Tenant } from '../storage/store.ts';
import type { ServerMetrics } from './metrics.ts';
import { DEFAULT_CHARS_PER_CONTEXT_TOKEN, TOKENIZE_PROMPT, promptChars, promptInput, tokenize } from '../prompts/prompt-input.ts';
import { toGenerationRequest, type GenerateOptions, type OpenAISampling } from './generation-request.ts';
import type { ModelRuntime } from './runtime.ts';
import type { SteeringResolver, SteerItem } from './steering.ts';
import type { TenantQueues } from './tenant-queue.ts';
import type { UsageMeter } from './usage.ts';
import type { PreparedGrammar } from '../grammar/service.ts';
import type { GrammarSpec } from '../grammar/spec.ts';
import { grammarThreadFailed } from '../errors.ts';

/**
 * Turns a route's validated request into an engine request (intervention resolved, input
 * tokenized) and runs it under the tenant's concurrency limit (waiting in the tenant's queue when
 * over it), metering it.
 */
export interface PreparedGeneration {
  id: string;
  /** The intervention or composition id `adapter`/`model` named, or null (the base model, or a list). */
  interventionId: string | null;
  request: GenerationRequest;
  /** Structured output: the compiled grammar; each row opens its own matcher when it runs. */
  grammar?: PreparedGrammar;
}

/** What a request applies: an intervention or composition by name (`field` names it), or a list of items. */
export interface SteeringInput {
  name: string | null | undefined;
  field: string;
  items?: readonly SteerItem[];
  returnCoefficients?: boolean;
}

/** Bounds on a prompt's text, checked before it is tokenized. */
export interface PromptBudget {
  /** Characters per prompt (all messages together); null: DEFAULT_CHARS_PER_CONTEXT_TOKEN × the model's context. */
  maxPromptChars: number | null;
}

export interface GenerationInput extends Omit<GenerateOptions, 'prompt' | 'messages' | 'input_ids'>, OpenAISampling {
  prompt?: string;
  messages?: Array<{ role: string; content: string }>;
  input_ids?: number[];
  cache_salt?: string;
  cache_prompt?: boolean;
}

export class GenerationService {
  constructor(
    private readonly runtime: () => ModelRuntime,
    private readonly queues: TenantQueues,
    private readonly metrics: ServerMetrics,
    private readonly usage: UsageMeter,
    private readonly steering: SteeringResolver,
    private readonly budget: PromptBudget = { maxPromptChars: null },
  ) {}

  get model(): ModelRuntime {
    return this.runtime();
  }

  /**
   * Runs a request's `work` (prepare, then run or stream) holding one slot of the tenant's
   * concurrency limit, taken before any response is started: over the limit it waits in the
   * tenant's queue (leaving it when `disconnected` aborts), a full queue is a real 429 with
   * Retry-After (streams too), and the slot is given back however `work` ends.
   */
  async admitted<T>(tenant: Tenant, disconnected: AbortSignal, work: (disconnected: AbortSignal) => Promise<T>): Promise<T> {
    const release = await this.queues.acquire(tenant.id, disconnected);
    try {
      return await work(disconnected);
    } finally {
      release();
    }
  }

  /**
   * Resolves what the request applies (nothing when the name is null or the base model's; see
   * steering.ts) and tokenizes the input in the offload pool, after checking its length.
   */
  async prepare(
    tenant: Tenant,
    steering: SteeringInput,
    input: GenerationInput,
    idPrefix = 'gen',
    grammar: GrammarSpec | null = null,
  ): Promise<PreparedGeneration> {
    const rt = this.runtime();
    const prompt = promptInput(input);
    const maxChars = this.budget.maxPromptChars ?? DEFAULT_CHARS_PER_CONTEXT_TOKEN * rt.config.maxPositions;
    const chars = promptChars(input);
    if (chars > maxChars) {
      throw promptTooManyChars({ chars, limit: maxChars }, 'prompt' in prompt ? 'prompt' : 'messages');
    }
    const { name, field } = steering;
    const isBase = name === undefined || name === null || name === rt.name || rt.aliases.includes(name);
    const resolved = await this.steering.resolve(tenant.id, { name, field, isBase }, steering.items);
    const tokens =
      'input_ids' in prompt
        ? tokenize(prompt, rt.tokenizer)
        : await rt.offload.run(TOKENIZE_PROMPT, { modelDir: rt.modelDir, input: prompt });
    const request: GenerationRequest = {
      tenant: tenant.id,
      ...toGenerationRequest(tokens, input, resolved.interventions, rt.config.maxPositions),
      ...(steering.returnCoefficients ? { returnCoefficients: true } : {}),
      ...(input.cache_prompt === false ? {} : { prefixCache: { namespace: prefixCacheNamespace(rt, tenant.id, input.cache_salt) } }),
    };
    // compiled last, once everything cheaper has been checked (on a grammar thread: see grammar/service.ts)
    const compiled = grammar ? await rt.grammars.prepare(grammar) : undefined;
    return { id: `${idPrefix}-${randomUUID()}`, interventionId: resolved.id, request, ...(compiled ? { grammar: compiled } : {}) };
  }

  /** Runs a prepared generation, recording metrics (inside `admitted`). */
  async run(
    tenant: Tenant,
    prepared: PreparedGeneration,
    opts: { signal?: AbortSignal; onToken?: (e: TokenEvent) => void } = {},
  ): Promise<GenerationResult> {
    const [result] = await this.runAll(tenant, [prepared], { signal: opts.signal, onToken: opts.onToken && ((_, e) => opts.onToken!(e)) });
    return result;
  }

  /**
   * Runs several generations of one request as separate rows the engine batches together (an
   * OpenAI `n` or a list of prompts); one failing cancels the rest. `onToken` gets each row's
   * index.
   */
  async runAll(
    tenant: Tenant,
    rows: PreparedGeneration[],
    opts: { signal?: AbortSignal; onToken?: (row: number, e: TokenEvent) => void } = {},
  ): Promise<GenerationResult[]> {
    const cancel = new AbortController();
    const signal = cancel.signal;
    const onAbort = () => cancel.abort();
    if (opts.signal?.aborted) cancel.abort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const results = await Promise.all(
        rows.map((row, i) =>
          this.runRow(row, signal, opts.onToken && ((e) => opts.onToken!(i, e))).catch((err: unknown) => {
            cancel.abort();
            throw err;
          }),
        ),
      );
      const promptTokens = results.reduce((n, r) => n + r.promptTokens, 0);
      const completionTokens = results.reduce((n, r) => n + r.tokens.length, 0);
      this.usage.add(tenant.id, { requests: 1, promptTokens, completionTokens });
      return results;
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  private async runRow(prepared: PreparedGeneration, signal: AbortSignal, onToken?: (e: TokenEvent) => void): Promise<GenerationResult> {
    const started = performance.now();
    let first = 0;
    const grammars = this.runtime().grammars;
    const row = prepared.grammar ? await prepared.grammar.open() : undefined;
    const request = row ? { ...prepared.request, grammar: row } : prepared.request;
    const result = await this.runtime()
      .engine.generate(request, {
        signal,
        onToken: (e) => {
          if (!first) {
            first = performance.now();
            this.metrics.timeToFirstToken.observe((first - started) / 1000);
          }
          onToken?.(e);
        },
      })
      .finally(() => row && grammars.release(row));
    if (result.finishReason === 'cancelled' && result.stoppedBy === 'grammar') {
      throw grammarThreadFailed();
    }
    this.metrics.promptTokens.inc(result.promptTokens);
    this.metrics.prefixCacheTokens.inc({ source: 'cached' }, result.cachedTokens);
    this.metrics.prefixCacheTokens.inc({ source: 'computed' }, result.promptTokens - result.cachedTokens);
    if (result.cachedTokens > 0) this.metrics.prefixCacheHits.inc();
    this.metrics.generatedTokens.inc(result.tokens.length);
    const decodeSeconds = (performance.now() - first) / 1000;
    if (result.tokens.length > 1 && decodeSeconds > 0) this.metrics.tokensPerSecond.observe((result.tokens.length - 1) / decodeSeconds);
    return result;
  }
}

/**
 * Where a prompt's blocks are shared: its tenant's namespace (or every tenant's, when the server
 * shares them), narrowed by the request's salt. Shared interventions do not widen it.
 */
function prefixCacheNamespace(rt: ModelRuntime, tenant: string, salt: string | undefined): string {
  const owner = rt.prefixCacheShared ? '*' : `tenant:${tenant}`;
  return salt === undefined ? owner : `${owner}\0salt:${salt}`;
}
