import { z } from 'zod';
import { checkPromptFits, type GenerationRequest } from '../engine/generation.ts';
import { promptEmpty } from '../errors.ts';
import type { LowRankIntervention } from '../interventions/artifact.ts';
import { messageSchema } from '../prompts/prompt-input.ts';

/**
 * What a caller may ask of a generation (the request fields, with the defaults and limits a
 * public server needs) and the engine's GenerationRequest made from it. Shared by the HTTP API
 * and the CLI.
 */
const MAX_STOP_STRINGS = 8;

export const samplingFields = {
  max_new_tokens: z.number().int().min(1).max(32768).default(128),
  temperature: z.number().min(0).max(10).default(0),
  top_p: z.number().gt(0).max(1).default(1),
  top_k: z.number().int().min(0).max(100000).default(0),
  seed: z
    .number()
    .int()
    .min(0)
    .max(2 ** 32 - 1)
    .optional(),
  stop: z.union([z.string().min(1).max(256), z.array(z.string().min(1).max(256)).max(MAX_STOP_STRINGS)]).optional(),
  ignore_eos: z.boolean().default(false),
  repetition_penalty: z.number().gt(0).max(10).default(1),
  logprobs: z.boolean().default(false),
  top_logprobs: z.number().int().min(0).max(20).default(0),
};

export const inputFields = {
  prompt: z.string().max(4_000_000).optional(),
  messages: z.array(messageSchema).min(1).max(1024).optional(),
  input_ids: z.array(z.number().int().min(0)).min(1).max(1_000_000).optional(),
};

/** The prefix cache, per request: the salt narrows the namespace a prompt's blocks are shared in; `cache_prompt: false` opts out. */
export const prefixCacheFields = {
  cache_salt: z
    .string()
    .min(1)
    .max(256)
    .optional()
    .describe("the prompt's cached blocks are shared only with requests of the same tenant sending the same salt"),
  cache_prompt: z
    .boolean()
    .optional()
    .describe("reuse and keep the prompt's prefix in the prefix cache (default true; false: compute it whole)"),
};

export const generateOptionsSchema = z.strictObject({ ...inputFields, ...samplingFields });
export type GenerateOptions = z.infer<typeof generateOptionsSchema>;

/** OpenAI's sampling adjustments, which only the OpenAI routes take. */
export interface OpenAISampling {
  frequency_penalty?: number;
  presence_penalty?: number;
  /** [token, bias] pairs. */
  logit_bias?: Array<[number, number]>;
}

export function toGenerationRequest(
  tokens: number[],
  o: Omit<GenerateOptions, 'prompt' | 'messages' | 'input_ids'> & OpenAISampling,
  interventions: readonly LowRankIntervention[],
  contextLength: number,
): GenerationRequest {
  if (tokens.length === 0) throw promptEmpty({ encodes: true }, 'prompt');
  checkPromptFits(tokens.length, contextLength);
  return {
    tokens,
    interventions,
    sampling: {
      temperature: o.temperature,
      topK: o.top_k,
      topP: o.top_p,
      repetitionPenalty: o.repetition_penalty,
      seed: o.seed,
      ...(o.frequency_penalty ? { frequencyPenalty: o.frequency_penalty } : {}),
      ...(o.presence_penalty ? { presencePenalty: o.presence_penalty } : {}),
      ...(o.logit_bias?.length ? { logitBias: o.logit_bias } : {}),
    },
    maxNewTokens: o.max_new_tokens,
    stop: o.stop === undefined ? [] : typeof o.stop === 'string' ? [o.stop] : o.stop,
    ignoreEos: o.ignore_eos,
    logprobs: o.logprobs || o.top_logprobs > 0,
    topLogprobs: o.top_logprobs,
  };
}
