import { z } from 'zod';
import { openaiErrorSchema } from '../../openai-error.ts';
import { messageSchema } from '../../../prompts/prompt-input.ts';
import { prefixCacheFields, samplingFields } from '../../generation-request.ts';
import { returnCoefficientsField, steerListSchema } from '../steer-schemas.ts';
import { structuredOutputFields } from '../../structured-output.ts';

/** The OpenAI routes' request and response bodies, as the OpenAPI document shows them. */

/** Choices one request may ask for (prompts × n): each is a row of the batch. */
export const MAX_CHOICES = 16;

/** Accepted for compatibility but refused unless null/absent (or a value that asks for nothing). */
const notSupported = z.unknown().optional().describe('not supported: refused unless null');

const common = {
  model: z.string().min(1).max(200).describe('the base model, or an intervention or saved composition by name or id (see /v1/models)'),
  max_tokens: z
    .number()
    .int()
    .min(1)
    .max(32768)
    .nullish()
    .describe('tokens to generate (default 16); refused when the prompt and this do not fit the context'),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  n: z.number().int().min(1).max(MAX_CHOICES).nullish().describe('choices per prompt, generated together as separate rows'),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  stop: samplingFields.stop.nullish(),
  seed: samplingFields.seed.nullish().describe('choice i samples with seed + i'),
  presence_penalty: z.number().min(-2).max(2).nullish(),
  frequency_penalty: z.number().min(-2).max(2).nullish(),
  logit_bias: z
    .record(z.string().regex(/^\d+$/, 'keys are token ids'), z.number().min(-100).max(100))
    .nullish()
    .describe('token id → bias added to its logit'),
  user: z.string().max(256).optional(),
  // extensions shared with /v1/generate
  top_k: samplingFields.top_k.optional(),
  repetition_penalty: samplingFields.repetition_penalty.optional(),
  ignore_eos: samplingFields.ignore_eos.optional(),
  interventions: steerListSchema
    .optional()
    .describe("extension (the clients' extra body): stored interventions applied together; `model` is then the base model"),
  return_coefficients: returnCoefficientsField
    .optional()
    .describe("extension: add `applied` (and `prompt_token_texts`) to each choice, on a stream to each choice's first chunk"),
  ...structuredOutputFields,
  ...prefixCacheFields,
};

const tokenIds = z.array(z.number().int().min(0)).min(1).max(1_000_000);
export const completionBody = z.strictObject({
  ...common,
  prompt: z
    .union([
      z.string().max(4_000_000),
      z.array(z.string().max(4_000_000)).min(1).max(MAX_CHOICES),
      tokenIds,
      z.array(tokenIds).min(1).max(MAX_CHOICES),
    ])
    .describe('a string, a list of strings (one completion each), token ids, or a list of token-id lists'),
  logprobs: z.number().int().min(0).max(20).nullish(),
  echo: z.boolean().nullish().describe("put the prompt before each choice's text"),
  suffix: notSupported,
  best_of: z.number().int().min(1).nullish().describe('only 1 (or n) is supported'),
});

export const chatBody = z.strictObject({
  ...common,
  messages: z.array(messageSchema).min(1).max(1024),
  max_completion_tokens: z.number().int().min(1).max(32768).nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
  tools: notSupported,
  tool_choice: notSupported,
  functions: notSupported,
  function_call: notSupported,
  parallel_tool_calls: notSupported,
  audio: notSupported,
  modalities: notSupported,
  prediction: notSupported,
  reasoning_effort: notSupported,
  web_search_options: notSupported,
  store: notSupported,
  metadata: notSupported,
  service_tier: notSupported,
});

const usageSchema = z.object({
  prompt_tokens: z.number().int(),
  completion_tokens: z.number().int(),
  total_tokens: z.number().int(),
  prompt_tokens_details: z.object({ cached_tokens: z.number().int().describe('prompt tokens read from the prefix cache, not computed') }),
});

export const completionResponse = z.looseObject({
  id: z.string(),
  object: z.literal('text_completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(z.looseObject({ index: z.number().int(), text: z.string(), finish_reason: z.string().nullable() })),
  usage: usageSchema,
});

export const chatResponse = completionResponse.extend({
  object: z.literal('chat.completion'),
  choices: z.array(
    z.looseObject({
      index: z.number().int(),
      message: z.object({ role: z.literal('assistant'), content: z.string() }),
      finish_reason: z.string().nullable(),
    }),
  ),
});

export const modelSchema = z.looseObject({
  id: z.string().describe('the name to pass as `model`'),
  object: z.literal('model'),
  created: z.number().int(),
  owned_by: z.string(),
  root: z.string().describe('the intervention id (an intervention) or the model source (the base model)'),
  parent: z.string().nullable().describe('the base model an intervention runs on'),
  max_model_len: z.number().int().optional(),
  weights: z
    .object({ format: z.string(), bytes: z.number().int() })
    .optional()
    .describe("the base model: its weights' format (f32, q8, q4) and their bytes as the engine holds them"),
});
export const modelList = z.object({ object: z.literal('list'), data: z.array(modelSchema) });

/**
 * A route's options: its errors in OpenAI's shape (the problem handler reads `errorShape`, the
 * document shows openaiErrorSchema), the openai tag, its request `parts` and its 200 response.
 */
export function openaiRoute<P extends { body?: z.ZodType; params?: z.ZodType }, R extends z.ZodType>(
  summary: string,
  response: R,
  parts: P,
) {
  return {
    config: { errorShape: 'openai' as const },
    schema: { summary, tags: ['openai'], ...parts, response: { 200: response, '4xx': openaiErrorSchema, '5xx': openaiErrorSchema } },
  };
}

/** The fields completions and chat completions share, as a handler sees them. */
export type Common = { [K in keyof typeof common]?: z.infer<(typeof common)[K]> };
export type CompletionPrompt = z.infer<typeof completionBody>['prompt'];
export type ModelEntry = z.infer<typeof modelSchema>;
