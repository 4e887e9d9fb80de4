import type { TrainingRow } from '../training/index.ts';

/**
 * Character budgets for text that gets tokenized. Tokenizing costs tens of µs a character with
 * the JS tokenizer, so the text is bounded before any of it is tokenized.
 */

/** A BPE token is ~4 characters on average; 16 per token of context leaves room for any real prompt. */
export const DEFAULT_CHARS_PER_CONTEXT_TOKEN = 16;

/** Characters of training text per job (prompt + completion / message contents, all rows). */
export const DEFAULT_MAX_TRAINING_CHARS = 4_000_000;

/** Rows of one training file or job. */
export const DEFAULT_MAX_TRAINING_ROWS = 10_000;

/** Characters the rows hold, counted without copying them. */
export function trainingChars(rows: readonly TrainingRow[]): number {
  let n = 0;
  for (const row of rows) {
    if ('messages' in row) for (const m of row.messages) n += m.content.length;
    else n += row.prompt.length + row.completion.length;
  }
  return n;
}

/** Characters of one prompt (or all messages' contents together). */
export function promptChars(input: { prompt?: string; messages?: Array<{ content: string }> }): number {
  if (input.prompt !== undefined) return input.prompt.length;
  return (input.messages ?? []).reduce((n, m) => n + m.content.length, 0);
}
