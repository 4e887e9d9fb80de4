import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { TokenLogprob } from '../../../engine/generation.ts';
import { topLogprobsWithoutLogprobs } from '../../../errors.ts';
import type { TextTokenizer } from '../../../model/tokenizer.ts';
import type { GenerationService } from '../../generation-service.ts';
import { logprobPieces, type Piece } from '../../logprob-pieces.ts';
import { appliedFields, disconnectSignal } from '../generate.ts';
import { checkMaxTokens, choicesOf, generationInput, refuseUnsupported, steeringOf } from './request.ts';
import { created, finishOf, streamOpenAI, usageOf } from './response.ts';
import { chatBody, chatResponse, openaiRoute } from './schemas.ts';
import { grammarSpecOf } from '../../structured-output.ts';

function chatLogprobs(lps: TokenLogprob[] | undefined, prompt: readonly number[], tokenizer: TextTokenizer) {
  if (!lps) return null;
  const entry = (p: Piece) => ({ token: p.text, logprob: p.logprob, bytes: p.bytes });
  return { content: logprobPieces(tokenizer, prompt, lps).map((p) => ({ ...entry(p), top_logprobs: (p.top ?? []).map(entry) })) };
}

/** POST /v1/chat/completions: one conversation, `n` choices. */
export function chatCompletionsRoute(app: FastifyInstance, service: GenerationService): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.post(
    '/v1/chat/completions',
    openaiRoute('OpenAI-compatible chat completion', chatResponse, { body: chatBody }),
    async (request, reply) =>
      service.admitted(request.tenant, disconnectSignal(reply), async (disconnected) => {
        const b = request.body;
        refuseUnsupported(b, [
          'tools',
          'tool_choice',
          'functions',
          'function_call',
          'parallel_tool_calls',
          'audio',
          'modalities',
          'prediction',
          'reasoning_effort',
          'web_search_options',
          'store',
          'metadata',
          'service_tier',
        ]);
        if (b.top_logprobs && !b.logprobs) throw topLogprobsWithoutLogprobs('top_logprobs');
        const n = b.n ?? 1;
        const tokenizer = service.model.tokenizer;
        const lp = b.logprobs ? Math.max(b.top_logprobs ?? 0, 0) : 0;
        const maxTokens =
          b.max_completion_tokens != null
            ? { value: b.max_completion_tokens, field: 'max_completion_tokens' }
            : { value: b.max_tokens, field: 'max_tokens' };
        const input = { ...generationInput(b, maxTokens.value, lp, tokenizer.vocabSize), messages: b.messages };
        if (b.logprobs) input.logprobs = true;
        const prepared = await service.prepare(request.tenant, steeringOf(b), input, 'chatcmpl', grammarSpecOf(b));
        checkMaxTokens(prepared, maxTokens, service.model.config.maxPositions);
        const rows = choicesOf([prepared], n);
        const base = { id: prepared.id, object: 'chat.completion' as const, created: created(), model: b.model };
        if (b.stream) {
          return streamOpenAI(
            service,
            request,
            reply,
            rows,
            (index, text, finish, first, applied) => {
              const delta = first ? { role: 'assistant', content: text } : finish ? {} : { content: text };
              const choice = { index, delta, logprobs: null, finish_reason: finish, ...applied };
              return { ...base, object: 'chat.completion.chunk', choices: [choice] };
            },
            b.stream_options?.include_usage
              ? (res) => ({ ...base, object: 'chat.completion.chunk', choices: [], usage: usageOf(res, n) })
              : null,
          );
        }
        const results = await service.runAll(request.tenant, rows, { signal: disconnected });
        return {
          ...base,
          choices: results.map((result, index) => ({
            index,
            message: { role: 'assistant' as const, content: result.text },
            logprobs: chatLogprobs(result.logprobs, prepared.request.tokens, tokenizer),
            finish_reason: finishOf(result),
            ...appliedFields(prepared, result.applied, tokenizer),
          })),
          usage: usageOf(results, n),
        };
      }),
  );
}
