import { z } from 'zod';
import { promptEmpty, promptInputAmbiguous, tokenOutOfVocabulary } from '../errors.ts';
import type { LowRankIntervention } from '../interventions/artifact.ts';
import type { ChatMessage, TextTokenizer } from '../model/tokenizer.ts';
import { checkPromptFits, type GenerationRequest } from '../engine/generation.ts';

/**
 * What a caller may ask of a generation, shared by the HTTP API and the CLI, with the defaults
 * and limits a public server needs.
 */
const MAX_STOP_STRINGS = 8;

export const messageSchema = z.strictObject({
  role: z.enum(['system', 'user', 'assistant', 'tool']),
  content: z.string().max(1_000_000),
});

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

export const generateOptionsSchema = z.strictObject({ ...inputFields, ...samplingFields });
export type GenerateOptions = z.infer<typeof generateOptionsSchema>;

export type PromptInput = { prompt: string } | { messages: ChatMessage[] } | { input_ids: number[] };

/** Exactly one of prompt, messages and input_ids. */
export function promptInput(o: { prompt?: string; messages?: ChatMessage[]; input_ids?: number[] }): PromptInput {
  const given = (['prompt', 'messages', 'input_ids'] as const).filter((k) => o[k] !== undefined);
  if (given.length !== 1) {
    throw promptInputAmbiguous({ given }, given[1] ?? 'prompt');
  }
  const k = given[0];
  return k === 'prompt' ? { prompt: o.prompt! } : k === 'messages' ? { messages: o.messages! } : { input_ids: o.input_ids! };
}

export function tokenize(input: PromptInput, tokenizer: TextTokenizer): number[] {
  if ('prompt' in input) return tokenizer.encode(input.prompt);
  if ('messages' in input) return tokenizer.encodeChat(input.messages, { addGenerationPrompt: true });
  for (const [i, id] of input.input_ids.entries()) {
    if (id >= tokenizer.vocabSize)
      throw tokenOutOfVocabulary({ field: `input_ids.${i}`, id, vocabSize: tokenizer.vocabSize }, `input_ids.${i}`);
  }
  return input.input_ids;
}

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
