import { trainingDataEmpty, trainingPromptTooLong, trainingRowInvalid } from '../errors.ts';
import type { ChatMessage, TextTokenizer } from '../model/tokenizer.ts';
import type { TrainingExample } from './batch.ts';

/**
 * Training rows → token ids. A row is a completion pair or a chat:
 * - {prompt, completion}: as pyreft's supervised data modules: the prompt is encoded alone
 *   (with the tokenizer's BOS) to find how many tokens it has, and the whole row is
 *   encode(prompt + completion) with EOS appended. The first promptLength tokens are the
 *   prompt (edited, not scored), the rest the completion (scored, EOS included, so the model
 *   learns to stop).
 * - {messages}: the chat template renders every message but the last as the prompt, with the
 *   generation prompt, and the whole conversation as the row; the last message must be the
 *   assistant's, and only its turn is scored. EOS is appended only if the rendered turn holds
 *   none of the model's EOS ids (templates usually end the turn with one).
 */
export type TrainingRow = { prompt: string; completion: string } | { messages: ChatMessage[] };

export function tokenizeRows(rows: readonly TrainingRow[], tokenizer: TextTokenizer, maxLength: number): TrainingExample[] {
  if (rows.length === 0) throw trainingDataEmpty({ what: 'training data' }, 'data');
  const eos = tokenizer.eosTokenIds[0];
  return rows.map((row, i) => {
    const field = `data.${i}`;
    const example = 'messages' in row ? chatExample(row.messages, tokenizer, eos, field) : completionExample(row, tokenizer, eos, field);
    if (example.promptLength === 0) throw trainingRowInvalid({ at: field, problem: 'the prompt has no tokens' }, field);
    if (example.promptLength >= maxLength)
      throw trainingPromptTooLong({ at: field, tokens: example.promptLength, context: maxLength }, field);
    // the completion is cut to the context, keeping at least one scored token
    return example.tokens.length > maxLength ? { ...example, tokens: example.tokens.slice(0, maxLength) } : example;
  });
}

function completionExample(
  row: { prompt: string; completion: string },
  tokenizer: TextTokenizer,
  eos: number | undefined,
  field: string,
): TrainingExample {
  if (typeof row.prompt !== 'string' || typeof row.completion !== 'string') {
    throw trainingRowInvalid({ at: field, problem: 'a row is {prompt, completion} with strings, or {messages}' }, field);
  }
  const promptLength = tokenizer.encode(row.prompt).length;
  const tokens = tokenizer.encode(row.prompt + row.completion);
  if (eos !== undefined) tokens.push(eos);
  if (tokens.length <= promptLength)
    throw trainingRowInvalid({ at: field, problem: 'the completion has no tokens' }, `${field}.completion`);
  return { tokens, promptLength };
}

function chatExample(messages: ChatMessage[], tokenizer: TextTokenizer, eos: number | undefined, field: string): TrainingExample {
  if (!Array.isArray(messages) || messages.length < 2)
    throw trainingRowInvalid({ at: `${field}.messages`, problem: 'needs a prompt and a final assistant message' }, `${field}.messages`);
  if (messages.at(-1)!.role !== 'assistant')
    throw trainingRowInvalid(
      { at: `${field}.messages`, problem: "the last message must be the assistant's (it is what is learned)" },
      `${field}.messages`,
    );
  const prompt = tokenizer.encodeChat(messages.slice(0, -1), { addGenerationPrompt: true });
  const tokens = tokenizer.encodeChat(messages);
  if (!prompt.every((t, k) => tokens[k] === t)) {
    throw trainingRowInvalid(
      { at: `${field}.messages`, problem: 'the chat template does not render the conversation as its prompt followed by the last turn' },
      `${field}.messages`,
    );
  }
  const completion = tokens.slice(prompt.length);
  if (eos !== undefined && !completion.some((t) => tokenizer.eosTokenIds.includes(t))) tokens.push(eos);
  if (tokens.length <= prompt.length)
    throw trainingRowInvalid({ at: `${field}.messages`, problem: 'the last message has no tokens' }, `${field}.messages`);
  return { tokens, promptLength: prompt.length };
}
