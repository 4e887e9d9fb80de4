import { logitBiasTooLarge, maxTokensOverContext, parameterUnsupported, tokenOutOfVocabulary } from '../../../errors.ts';
import type { GenerationInput, PreparedGeneration } from '../../generation-service.ts';
import type { Common } from './schemas.ts';

/** From an OpenAI request body to the server's generations: sampling, checks, choices. */

const MAX_LOGIT_BIAS = 1024;

/** Refuses a field this server can't honour, by name; `harmless` values ask for nothing. */
export function refuseUnsupported(body: Record<string, unknown>, fields: readonly string[]): void {
  for (const f of fields) {
    const v = body[f];
    const harmless =
      v === undefined || v === null || v === false || (Array.isArray(v) && v.length === 0) || (f === 'tool_choice' && v === 'none');
    if (!harmless) throw parameterUnsupported({ name: f }, f);
  }
}

function logitBias(bias: Record<string, number> | null | undefined, vocabSize: number): Array<[number, number]> | undefined {
  if (!bias) return undefined;
  const entries = Object.entries(bias);
  if (entries.length > MAX_LOGIT_BIAS) throw logitBiasTooLarge({ entries: entries.length, limit: MAX_LOGIT_BIAS }, 'logit_bias');
  return entries.map(([k, v]) => {
    const id = Number(k);
    if (id >= vocabSize) throw tokenOutOfVocabulary({ field: `logit_bias.${k}`, id: k, vocabSize }, `logit_bias.${k}`);
    return [id, v];
  });
}

export function generationInput(
  b: Common,
  maxTokens: number | null | undefined,
  logprobs: number,
  vocabSize: number,
): Omit<GenerationInput, 'prompt' | 'messages' | 'input_ids'> {
  return {
    max_new_tokens: maxTokens ?? 16,
    temperature: b.temperature ?? 1,
    top_p: b.top_p ?? 1,
    top_k: b.top_k ?? 0,
    seed: b.seed ?? undefined,
    stop: b.stop ?? undefined,
    ignore_eos: b.ignore_eos ?? false,
    repetition_penalty: b.repetition_penalty ?? 1,
    logprobs: logprobs > 0,
    top_logprobs: logprobs,
    frequency_penalty: b.frequency_penalty ?? 0,
    presence_penalty: b.presence_penalty ?? 0,
    logit_bias: logitBias(b.logit_bias, vocabSize),
    cache_salt: b.cache_salt,
    cache_prompt: b.cache_prompt,
  };
}

/**
 * An explicit max_tokens the context can't hold is refused (rather than silently cut short);
 * the default is only capped by the context.
 */
export function checkMaxTokens(
  prepared: PreparedGeneration,
  maxTokens: { value: number | null | undefined; field: string },
  context: number,
): void {
  const promptTokens = prepared.request.tokens.length;
  if (maxTokens.value != null && promptTokens + maxTokens.value > context) {
    throw maxTokensOverContext({ context, promptTokens, field: maxTokens.field, asked: maxTokens.value }, maxTokens.field);
  }
}

/** What a request applies: `model` (an intervention, a composition or the base model) or `interventions`. */
export function steeringOf(b: Common) {
  return { name: b.model, field: 'model', items: b.interventions, returnCoefficients: b.return_coefficients ?? false };
}

/** The rows of a request: each prompt `n` times, choice i of a prompt sampling with seed + i. */
export function choicesOf(prompts: PreparedGeneration[], n: number): PreparedGeneration[] {
  return prompts.flatMap((p) =>
    Array.from({ length: n }, (_, i) => {
      const seed = p.request.sampling.seed;
      return i === 0 || seed === undefined
        ? p
        : { ...p, request: { ...p.request, sampling: { ...p.request.sampling, seed: (seed + i) % 2 ** 32 } } };
    }),
  );
}
