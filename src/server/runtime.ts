import { randomUUID } from 'node:crypto';
import type { EngineClient } from '../engine/engine-client.ts';
import type { GenerationRequest, GenerationResult, TokenEvent } from '../engine/generation.ts';
import { promptInput, toGenerationRequest, tokenize, type GenerateOptions } from '../engine/options.ts';
import { ReftError } from '../errors.ts';
import type { InterventionCache } from '../interventions/cache.ts';
import type { ModelConfig } from '../model/config.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import type { Tenant } from '../storage/store.ts';
import type { ServerMetrics } from './metrics.ts';
import type { ConcurrencyLimiter } from './tenant-limits.ts';
import type { UsageMeter } from './usage.ts';

/**
 * What the routes need once the model is loaded: the base model's name, config and tokenizer,
 * the engine, and the intervention cache. Until then the server answers health checks and
 * refuses generation with 503.
 */
export interface ModelRuntime {
  name: string;
  config: ModelConfig;
  tokenizer: TextTokenizer;
  engine: EngineClient;
  interventions: InterventionCache;
}

export interface PreparedGeneration {
  id: string;
  /** The intervention id used, or null for the base model. */
  adapter: string | null;
  request: GenerationRequest;
}

export interface GenerationInput extends Omit<GenerateOptions, 'prompt' | 'messages' | 'input_ids'> {
  prompt?: string;
  messages?: Array<{ role: string; content: string }>;
  input_ids?: number[];
}

export class GenerationService {
  constructor(
    private readonly runtime: () => ModelRuntime,
    private readonly limiter: ConcurrencyLimiter,
    private readonly metrics: ServerMetrics,
    private readonly usage: UsageMeter,
  ) {}

  get model(): ModelRuntime {
    return this.runtime();
  }

  /** Resolves the adapter (null or the base model's name: none) and tokenizes the input. */
  async prepare(tenant: Tenant, adapter: string | null | undefined, input: GenerationInput, idPrefix = 'gen'): Promise<PreparedGeneration> {
    const rt = this.runtime();
    const useBase = adapter === undefined || adapter === null || adapter === rt.name;
    const resolved = useBase ? null : await rt.interventions.resolve(tenant.id, adapter);
    const tokens = tokenize(promptInput(input), rt.tokenizer);
    const request = toGenerationRequest(tokens, input, resolved?.interventions ?? [], rt.config.maxPositions);
    return { id: `${idPrefix}-${randomUUID()}`, adapter: resolved?.id ?? null, request };
  }

  /** Runs a prepared generation under the tenant's concurrency limit, recording metrics. */
  async run(tenant: Tenant, prepared: PreparedGeneration, opts: { signal?: AbortSignal; onToken?: (e: TokenEvent) => void } = {}): Promise<GenerationResult> {
    const release = this.limiter.acquire(tenant.id);
    const started = performance.now();
    let first = 0;
    try {
      const result = await this.runtime().engine.generate(prepared.request, {
        signal: opts.signal,
        onToken: (e) => {
          if (!first) {
            first = performance.now();
            this.metrics.timeToFirstToken.observe((first - started) / 1000);
          }
          opts.onToken?.(e);
        },
      });
      this.metrics.promptTokens.inc(result.promptTokens);
      this.metrics.generatedTokens.inc(result.tokens.length);
      this.usage.add(tenant.id, { requests: 1, promptTokens: result.promptTokens, completionTokens: result.tokens.length });
      const decodeSeconds = (performance.now() - first) / 1000;
      if (result.tokens.length > 1 && decodeSeconds > 0) this.metrics.tokensPerSecond.observe((result.tokens.length - 1) / decodeSeconds);
      return result;
    } finally {
      release();
    }
  }
}

export function notReady(): ReftError {
  return new ReftError('unavailable', 'the model is still loading', undefined, 2);
}
