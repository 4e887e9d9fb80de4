import type { FastifyInstance, FastifyReply } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { AppliedEdit, GenerationResult } from '../../engine/generation.ts';
import { inputFields, prefixCacheFields, samplingFields } from '../generation-request.ts';
import type { TextTokenizer } from '../../model/tokenizer.ts';
import { problemOf, toReftError } from '../problem.ts';
import type { GenerationService, PreparedGeneration } from '../generation-service.ts';
import { SseStream } from '../sse.ts';
import { grammarSpecOf, structuredOutputFields } from '../structured-output.ts';
import { logprobPieces } from '../logprob-pieces.ts';
import { problemSchema } from './schemas.ts';
import { appliedSchema, promptTokenTextsSchema, returnCoefficientsField, steerListSchema } from './steer-schemas.ts';

const generateBody = z.strictObject({
  adapter: z
    .string()
    .min(1)
    .max(200)
    .nullable()
    .optional()
    .describe('an intervention or saved composition, by id or name; omit (or the base model name) for the base model'),
  interventions: steerListSchema
    .optional()
    .describe('stored interventions applied together, each with its own settings; not with `adapter`'),
  return_coefficients: returnCoefficientsField,
  ...inputFields,
  ...samplingFields,
  stream: z.boolean().default(false).describe('stream tokens as server-sent events'),
  ...structuredOutputFields,
  ...prefixCacheFields,
});

const logprobSchema = z.object({
  token_id: z.number().int(),
  text: z.string(),
  logprob: z.number(),
  top_logprobs: z.array(z.object({ token_id: z.number().int(), text: z.string(), logprob: z.number() })).optional(),
});

const generateResponse = z.object({
  id: z.string(),
  adapter: z.string().nullable(),
  text: z.string(),
  token_ids: z.array(z.number().int()),
  finish_reason: z.enum(['stop', 'length', 'cancelled']),
  stop_reason: z.string().nullable(),
  usage: z.object({
    prompt_tokens: z.number().int(),
    completion_tokens: z.number().int(),
    total_tokens: z.number().int(),
    prompt_tokens_details: z.object({ cached_tokens: z.number().int().describe('prompt tokens read from the prefix cache, not computed') }),
  }),
  logprobs: z.array(logprobSchema).optional(),
  applied: appliedSchema.optional(),
  prompt_token_texts: promptTokenTextsSchema.optional(),
});

/** With return_coefficients: what each intervention did, and the prompt tokens its positions index. */
export function appliedFields(p: PreparedGeneration, applied: AppliedEdit[][] | undefined, tokenizer: TextTokenizer) {
  if (!p.request.returnCoefficients) return {};
  const tokens = p.request.tokens;
  return {
    applied: applied ?? [],
    // a special token (BOS) decodes to nothing: its name says which row it is
    prompt_token_texts: tokens.map((t, i) => tokenizer.piece(t, i ? tokens[i - 1] : undefined).text || (tokenizer.tokenString(t) ?? '')),
  };
}

export function generateResponseBody(
  p: PreparedGeneration,
  r: GenerationResult,
  tokenizer: TextTokenizer,
): z.infer<typeof generateResponse> {
  return {
    id: p.id,
    adapter: p.interventionId,
    text: r.text,
    token_ids: r.tokens,
    finish_reason: r.finishReason,
    stop_reason: r.stoppedBy ?? null,
    usage: {
      prompt_tokens: r.promptTokens,
      completion_tokens: r.tokens.length,
      total_tokens: r.promptTokens + r.tokens.length,
      prompt_tokens_details: { cached_tokens: r.cachedTokens },
    },
    ...(r.logprobs
      ? {
          logprobs: logprobPieces(tokenizer, p.request.tokens, r.logprobs).map((lp) => ({
            token_id: lp.token,
            text: lp.text,
            logprob: lp.logprob,
            ...(lp.top ? { top_logprobs: lp.top.map((t) => ({ token_id: t.token, text: t.text, logprob: t.logprob })) } : {}),
          })),
        }
      : {}),
    ...appliedFields(p, r.applied, tokenizer),
  };
}

/** Aborts when the client closes the connection before the response is sent. */
export function disconnectSignal(reply: FastifyReply): AbortSignal {
  const controller = new AbortController();
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  return controller.signal;
}

export function generateRoutes(app: FastifyInstance, service: GenerationService): void {
  app.withTypeProvider<ZodTypeProvider>().post(
    '/v1/generate',
    {
      schema: {
        summary: 'Generate with an optional intervention',
        tags: ['generation'],
        body: generateBody,
        response: { 200: generateResponse, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) =>
      service.admitted(request.tenant, disconnectSignal(reply), async (disconnected) => {
        const { adapter, interventions, return_coefficients, stream, response_format, structured_outputs, ...input } = request.body;
        const steering = { name: adapter, field: 'adapter', items: interventions, returnCoefficients: return_coefficients };
        const grammar = grammarSpecOf({ response_format, structured_outputs });
        const prepared = await service.prepare(request.tenant, steering, input, 'gen', grammar);
        const tokenizer = service.model.tokenizer;
        if (!stream) {
          const result = await service.run(request.tenant, prepared, { signal: disconnected });
          return generateResponseBody(prepared, result, tokenizer);
        }
        const sse = new SseStream(request, reply);
        try {
          const result = await service.run(request.tenant, prepared, {
            signal: sse.signal,
            onToken: (e) => {
              // the readout comes once, as its own event, before the first token
              if (e.applied) sse.send({ type: 'applied', ...appliedFields(prepared, e.applied, tokenizer) });
              sse.send({ type: 'token', token_id: e.token, text: e.text, ...(e.logprob ? { logprob: e.logprob.logprob } : {}) });
            },
          });
          // the readout went once, before the first token: the final event leaves it out
          const { applied: _, prompt_token_texts: __, ...done } = generateResponseBody(prepared, result, tokenizer);
          sse.send({ type: 'done', ...done });
        } catch (err) {
          sse.send({ type: 'error', error: problemOf(toReftError(err)) });
        }
        sse.end();
      }),
  );
}
