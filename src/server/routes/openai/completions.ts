import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { TokenLogprob } from '../../../engine/generation.ts';
import { choicesTooMany, parameterUnsupported } from '../../../errors.ts';
import type { TextTokenizer } from '../../../model/tokenizer.ts';
import type { GenerationService, PreparedGeneration } from '../../generation-service.ts';
import { logprobPieces } from '../../logprob-pieces.ts';
import { appliedFields, disconnectSignal } from '../generate.ts';
import { checkMaxTokens, choicesOf, generationInput, refuseUnsupported, steeringOf } from './request.ts';
import { created, finishOf, streamOpenAI, usageOf } from './response.ts';
import { MAX_CHOICES, completionBody, completionResponse, openaiRoute, type CompletionPrompt } from './schemas.ts';
import { grammarSpecOf } from '../../structured-output.ts';

function completionLogprobs(lps: TokenLogprob[] | undefined, prompt: readonly number[], tokenizer: TextTokenizer) {
  if (!lps) return null;
  const pieces = logprobPieces(tokenizer, prompt, lps);
  const offsets: number[] = [];
  let at = 0;
  for (const p of pieces) {
    offsets.push(at);
    at += p.text.length;
  }
  return {
    tokens: pieces.map((p) => p.text),
    token_logprobs: pieces.map((p) => p.logprob),
    top_logprobs: pieces.map((p) => Object.fromEntries((p.top ?? []).map((t) => [t.text, t.logprob]))),
    text_offset: offsets,
  };
}

/** One prompt or several: a list of strings or a list of token-id lists is several. */
function promptList(prompt: CompletionPrompt): Array<string | number[]> {
  if (typeof prompt === 'string') return [prompt];
  if (typeof prompt[0] === 'number') return [prompt as number[]];
  return prompt as Array<string | number[]>;
}

/** POST /v1/completions: one or several prompts, `n` choices each. */
export function completionsRoute(app: FastifyInstance, service: GenerationService): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.post(
    '/v1/completions',
    openaiRoute('OpenAI-compatible text completion', completionResponse, { body: completionBody }),
    async (request, reply) =>
      service.admitted(request.tenant, disconnectSignal(reply), async (disconnected) => {
        const b = request.body;
        refuseUnsupported(b, ['suffix']);
        const n = b.n ?? 1;
        if (b.best_of != null && b.best_of !== n)
          throw parameterUnsupported({ name: 'best_of', detail: 'is not supported (other than equal to n)' }, 'best_of');
        if (b.echo && b.logprobs != null)
          throw parameterUnsupported(
            { name: 'echo', detail: 'with `logprobs` is not supported (prompt logprobs are not computed)' },
            'echo',
          );
        const prompts = promptList(b.prompt);
        if (prompts.length * n > MAX_CHOICES) throw choicesTooMany({ prompts: prompts.length, n, limit: MAX_CHOICES }, 'n');
        const tokenizer = service.model.tokenizer;
        const context = service.model.config.maxPositions;
        const sampling = generationInput(b, b.max_tokens, b.logprobs ?? 0, tokenizer.vocabSize);
        const grammar = grammarSpecOf(b);
        const prepared: PreparedGeneration[] = [];
        for (const p of prompts) {
          const one = await service.prepare(
            request.tenant,
            steeringOf(b),
            { ...sampling, ...(typeof p === 'string' ? { prompt: p } : { input_ids: p }) },
            'cmpl',
            grammar,
          );
          checkMaxTokens(one, { value: b.max_tokens, field: 'max_tokens' }, context);
          prepared.push(one);
        }
        const rows = choicesOf(prepared, n);
        const echo = (i: number) => {
          const p = prompts[Math.floor(i / n)];
          return b.echo ? (typeof p === 'string' ? p : tokenizer.decode(p)) : '';
        };
        const base = { id: prepared[0].id, object: 'text_completion' as const, created: created(), model: b.model };
        if (b.stream) {
          return streamOpenAI(
            service,
            request,
            reply,
            rows,
            (index, text, finish, first, applied) => {
              // the echoed prompt leads each choice's first chunk
              if (first) text = echo(index) + text;
              return { ...base, choices: [{ index, text, logprobs: null, finish_reason: finish, ...applied }] };
            },
            b.stream_options?.include_usage ? (res) => ({ ...base, choices: [], usage: usageOf(res, n) }) : null,
          );
        }
        const results = await service.runAll(request.tenant, rows, { signal: disconnected });
        return {
          ...base,
          choices: results.map((result, index) => ({
            index,
            text: echo(index) + result.text,
            logprobs: completionLogprobs(result.logprobs, rows[index].request.tokens, tokenizer),
            finish_reason: finishOf(result),
            ...appliedFields(rows[index], result.applied, tokenizer),
          })),
          usage: usageOf(results, n),
        };
      }),
  );
}
