import type { FastifyReply, FastifyRequest } from 'fastify';
import type { GenerationResult } from '../../../engine/generation.ts';
import type { GenerationService, PreparedGeneration } from '../../generation-service.ts';
import { openaiErrorOf } from '../../openai-error.ts';
import { toReftError } from '../../problem.ts';
import { SseStream } from '../../sse.ts';
import { appliedFields } from '../generate.ts';

/** Generations back in OpenAI's shapes: usage, finish reasons, a stream of chunks. */

export function usageOf(results: GenerationResult[], n: number) {
  // each prompt counts once, as OpenAI counts it, however many choices it has
  const prompts = results.filter((_, i) => i % n === 0);
  const prompt = prompts.reduce((sum, r) => sum + r.promptTokens, 0);
  const cached = prompts.reduce((sum, r) => sum + r.cachedTokens, 0);
  const completion = results.reduce((sum, r) => sum + r.tokens.length, 0);
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: cached },
  };
}

export const finishOf = (r: GenerationResult) => (r.finishReason === 'cancelled' ? 'length' : r.finishReason);
export const created = () => Math.floor(Date.now() / 1000);

export async function streamOpenAI(
  service: GenerationService,
  request: FastifyRequest,
  reply: FastifyReply,
  rows: PreparedGeneration[],
  /** One choice's chunk; `first` for the first chunk of choice `index`. */
  chunk: (index: number, text: string, finish: string | null, first: boolean, applied?: object) => unknown,
  usageChunk: ((results: GenerationResult[]) => unknown) | null,
): Promise<void> {
  const sse = new SseStream(request, reply);
  const tokenizer = service.model.tokenizer;
  const started = new Set<number>();
  const send = (i: number, text: string, finish: string | null, applied?: object) => {
    sse.send(chunk(i, text, finish, !started.has(i), applied));
    started.add(i);
  };
  try {
    const results = await service.runAll(request.tenant, rows, {
      signal: sse.signal,
      onToken: (i, e) => {
        if (e.applied) send(i, e.text, null, appliedFields(rows[i], e.applied, tokenizer));
        else if (e.text) send(i, e.text, null);
      },
    });
    results.forEach((r, i) => send(i, '', finishOf(r)));
    if (usageChunk) sse.send(usageChunk(results));
    sse.send('[DONE]');
  } catch (err) {
    sse.send(openaiErrorOf(toReftError(err)));
  }
  sse.end();
}
