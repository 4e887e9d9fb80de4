import { z } from 'zod';
import { promptInputAmbiguous, tokenOutOfVocabulary } from '../errors.ts';
import { cachedTokenizer } from '../model/load.ts';
import type { ChatMessage, TextTokenizer } from '../model/tokenizer.ts';
import { offloadTask } from '../offload/task.ts';

/**
 * What a prompt is as callers give it (text, chat messages or token ids), which one a request
 * chose, its size before tokenizing, and its tokens. Shared by the HTTP API, the CLI and the
 * training data (whose rows hold chat messages too).
 */

/** One chat message, as requests and training rows write it. */
export const messageSchema = z.strictObject({
  role: z.enum(['system', 'user', 'assistant', 'tool']),
  content: z.string().max(1_000_000),
});

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

/** `tokenize` in an offload pool thread, with the tokenizer of the model in `modelDir`. */
export async function tokenizeWithModel({ modelDir, input }: { modelDir: string; input: PromptInput }): Promise<number[]> {
  return tokenize(input, (await cachedTokenizer(modelDir)).tokenizer);
}

export const TOKENIZE_PROMPT = offloadTask(import.meta.url, { tokenizeWithModel });

/**
 * Tokenizing costs tens of µs a character with the JS tokenizer, so a prompt's text is bounded
 * before any of it is tokenized. A BPE token is ~4 characters on average; 16 per token of
 * context leaves room for any real prompt.
 */
export const DEFAULT_CHARS_PER_CONTEXT_TOKEN = 16;

/** Characters of one prompt (or all messages' contents together). */
export function promptChars(input: { prompt?: string; messages?: Array<{ content: string }> }): number {
  if (input.prompt !== undefined) return input.prompt.length;
  return (input.messages ?? []).reduce((n, m) => n + m.content.length, 0);
}
