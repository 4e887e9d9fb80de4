import { defineError } from './reft-error.ts';

/** The request itself: its body, parts and parameters, the prompt, sampling and the OpenAI fields. */

// the HTTP body
export const bodyInvalid = defineError(
  'body_invalid',
  'invalid_request',
  (p: { where: string; field: string; problem: string }) => `${p.where}${p.field}: ${p.problem}`,
);
export const bodyEmpty = defineError('body_empty', 'invalid_request', () => 'the JSON body is empty');
export const bodyNotJson = defineError(
  'body_not_json',
  'invalid_request',
  (p: { reason: string }) => `the body is not valid JSON: ${p.reason}`,
);
export const bodyTooDeep = defineError(
  'body_too_deep',
  'invalid_request',
  (p: { limit: number }) => `the JSON body nests deeper than ${p.limit} levels (the JSON depth limit)`,
);
export const bodyTooLarge = defineError(
  'body_too_large',
  'payload_too_large',
  (p: { reason: string }) => `request body too large: ${p.reason}`,
);
export const mediaTypeUnsupported = defineError('media_type_unsupported', 'unsupported_media_type', (p: { reason: string }) => p.reason);
/** A 4xx fastify raised itself that has no entry of its own (its words kept). */
export const requestRefused = defineError('request_refused', 'invalid_request', (p: { reason: string }) => p.reason);
export const routeNotFound = defineError(
  'route_not_found',
  'not_found',
  (p: { method: string; path: string }) => `no route ${p.method} ${p.path}`,
);

// multipart uploads
export const multipartExpected = defineError('multipart_expected', 'unsupported_media_type', () => 'expected a multipart/form-data body');
export const multipartPartUnknown = defineError(
  'multipart_part_unknown',
  'invalid_request',
  (p: { part: string; expected: readonly string[] }) => `unknown part "${p.part}" (expected ${p.expected.join(', ')})`,
);
export const multipartPartRepeated = defineError(
  'multipart_part_repeated',
  'invalid_request',
  (p: { part: string; times: number }) => `part "${p.part}" is given more than ${p.times === 1 ? 'once' : `${p.times} times`}`,
);
export const multipartPartMissing = defineError(
  'multipart_part_missing',
  'invalid_request',
  (p: { part: string }) => `missing part "${p.part}"`,
);
export const multipartPartTooLarge = defineError(
  'multipart_part_too_large',
  'payload_too_large',
  (p: { what: 'part' | 'field'; part: string; limit: number }) => `${p.what} "${p.part}" is too large: over its limit of ${p.limit} bytes`,
);
export const uploadTooLarge = defineError(
  'upload_too_large',
  'payload_too_large',
  (p: { limit: number }) => `the upload is too large: over its limit of ${p.limit} bytes`,
);
export const nameInvalid = defineError(
  'name_invalid',
  'invalid_request',
  (p: { field: string; problem: string }) => `${p.field}: ${p.problem}`,
);
export const flagInvalid = defineError('flag_invalid', 'invalid_request', (p: { field: string }) => `${p.field} must be "true" or "false"`);

// the prompt
export const promptInputAmbiguous = defineError('prompt_input_ambiguous', 'invalid_request', (p: { given: readonly string[] }) =>
  p.given.length
    ? `give only one of prompt, messages, input_ids (got ${p.given.join(', ')})`
    : 'one of prompt, messages or input_ids is required',
);
export const tokenOutOfVocabulary = defineError(
  'token_out_of_vocabulary',
  'invalid_request',
  (p: { field: string; id: number | string; vocabSize: number }) =>
    `${p.field}: token id ${p.id} is outside the vocabulary (size ${p.vocabSize})`,
);
export const promptEmpty = defineError('prompt_empty', 'invalid_request', (p: { encodes?: boolean }) =>
  p.encodes ? 'the prompt encodes to no tokens' : 'the prompt has no tokens',
);
export const promptTooLong = defineError(
  'prompt_too_long',
  'context_length_exceeded',
  (p: { tokens: number; context: number; newToken?: boolean }) =>
    `the prompt has ${p.tokens} tokens; the model's context is ${p.context}${p.newToken ? ' (the prompt and at least one new token must fit)' : ''}`,
);
export const promptTooManyChars = defineError(
  'prompt_too_many_chars',
  'payload_too_large',
  (p: { chars: number; limit: number }) => `the prompt has ${p.chars} characters, over the prompt limit of ${p.limit}`,
);
export const maxTokensOverContext = defineError(
  'max_tokens_over_context',
  'context_length_exceeded',
  (p: { context: number; promptTokens: number; field: string; asked: number }) =>
    `the model's context is ${p.context} tokens; the prompt has ${p.promptTokens} and ${p.field} asks for ${p.asked} more (at most ${p.context - p.promptTokens})`,
);
export const sequenceReachedContext = defineError(
  'sequence_reached_context',
  'context_length_exceeded',
  (p: { context: number }) => `a sequence reached the model's context of ${p.context} tokens`,
);
export const tokensInFlightExceeded = defineError(
  'tokens_in_flight_exceeded',
  'invalid_request',
  (p: { budget: number; limit: number }) =>
    `prompt plus max_new_tokens (${p.budget}) exceeds the server's max tokens in flight (${p.limit})`,
);
export const chatTemplateMissing = defineError(
  'chat_template_missing',
  'invalid_request',
  () => 'this model has no chat template; send a plain prompt instead of messages',
);
export const chatMessagesRejected = defineError(
  'chat_messages_rejected',
  'invalid_request',
  (p: { reason: string }) => `the chat template rejected the messages: ${p.reason}`,
);

// the OpenAI-compatible routes
export const modelNotFound = defineError('model_not_found', 'not_found', (p: { id: string }) => `no model "${p.id}"`);
export const parameterUnsupported = defineError(
  'parameter_unsupported',
  'invalid_request',
  (p: { name: string; detail?: string }) => `\`${p.name}\` ${p.detail ?? 'is not supported'}`,
);
export const logitBiasTooLarge = defineError(
  'logit_bias_too_large',
  'invalid_request',
  (p: { entries: number; limit: number }) => `logit_bias has ${p.entries} entries; at most ${p.limit}`,
);
export const choicesTooMany = defineError(
  'choices_too_many',
  'invalid_request',
  (p: { prompts: number; n: number; limit: number }) =>
    `${p.prompts} prompts × n = ${p.n} is ${p.prompts * p.n} choices; at most ${p.limit}`,
);
export const topLogprobsWithoutLogprobs = defineError(
  'top_logprobs_without_logprobs',
  'invalid_request',
  () => 'top_logprobs needs logprobs: true',
);

// query parameters
export const usageRangeInvalid = defineError('usage_range_invalid', 'invalid_request', (p: { problem: string }) => p.problem);
export const cursorUnknown = defineError('cursor_unknown', 'invalid_request', (p: { cursor: string }) => `unknown cursor "${p.cursor}"`);

// command-line options (the CLI's own commands)
export const cliOptionInvalid = defineError(
  'cli_option_invalid',
  'invalid_request',
  (p: { option: string; problem: string }) => `--${p.option}: ${p.problem}`,
);

// the catalogue's own pages
export const problemTypeNotFound = defineError(
  'problem_type_not_found',
  'not_found',
  (p: { code: string }) => `no error code "${p.code}" in the catalogue (GET /problems lists them)`,
);

// structured output (response_format, structured_outputs)
export const grammarInvalid = defineError(
  'grammar_invalid',
  'invalid_request',
  (p: { what: string; reason: string }) => `the ${p.what} can't be used to constrain the output: ${p.reason}`,
);
export const grammarTooLarge = defineError(
  'grammar_too_large',
  'invalid_request',
  (p: { what: string; bytes: number; limit: number }) => `the ${p.what} is ${p.bytes} bytes, over the limit of ${p.limit}`,
);
export const grammarTooDeep = defineError(
  'grammar_too_deep',
  'invalid_request',
  (p: { depth: number; limit: number }) => `the schema nests ${p.depth} levels deep, over the limit of ${p.limit}`,
);
export const grammarCompileTimeout = defineError(
  'grammar_compile_timeout',
  'invalid_request',
  (p: { what: string; limit: number }) => `the ${p.what} took longer than ${p.limit} ms to compile (the compile-time limit)`,
);
export const structuredOutputAmbiguous = defineError('structured_output_ambiguous', 'invalid_request', (p: { given: string[] }) =>
  p.given.length
    ? `give one way to constrain the output, not ${p.given.join(' and ')}`
    : 'structured_outputs names no constraint (json, choice, grammar or json_object)',
);
