import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { GenerationResult, TokenLogprob } from '../../engine/generation.ts';
import { messageSchema, samplingFields } from '../protocol.ts';
import { invalidRequest } from '../../errors.ts';
import type { TextTokenizer } from '../../model/tokenizer.ts';
import type { Store } from '../../storage/store.ts';
import { problemOf, toReftError } from '../problem.ts';
import type { GenerationInput, GenerationService, PreparedGeneration } from '../generation-service.ts';
import { SseStream } from '../sse.ts';
import { logprobPieces, type Piece } from '../logprob-pieces.ts';
import { disconnectSignal } from './generate.ts';
import { problemSchema } from './schemas.ts';

/**
 * OpenAI-compatible completions, chat completions and model listing, so existing clients
 * (the official SDKs) work unchanged. `model` names an intervention (id or name) or the base
 * model. Fields OpenAI defines but this server can't honour are refused, not ignored.
 */
const common = {
  model: z.string().min(1).max(200),
  max_tokens: z.number().int().min(1).max(32768).nullish(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  n: z.literal(1).nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  stop: samplingFields.stop.nullish(),
  seed: samplingFields.seed.nullish(),
  presence_penalty: z.literal(0).nullish(),
  frequency_penalty: z.literal(0).nullish(),
  user: z.string().max(256).optional(),
  // extensions shared with /v1/generate
  top_k: samplingFields.top_k.optional(),
  repetition_penalty: samplingFields.repetition_penalty.optional(),
  ignore_eos: samplingFields.ignore_eos.optional(),
};

const completionBody = z.strictObject({
  ...common,
  prompt: z.union([z.string().max(4_000_000), z.array(z.number().int().min(0)).min(1).max(1_000_000)]),
  logprobs: z.number().int().min(0).max(20).nullish(),
  echo: z.literal(false).nullish(),
  suffix: z.null().optional(),
  best_of: z.literal(1).nullish(),
});

const chatBody = z.strictObject({
  ...common,
  messages: z.array(messageSchema).min(1).max(1024),
  max_completion_tokens: z.number().int().min(1).max(32768).nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
});

const completionResponse = z.looseObject({
  id: z.string(),
  object: z.literal('text_completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(z.looseObject({ index: z.number().int(), text: z.string(), finish_reason: z.string().nullable() })),
  usage: z.looseObject({ prompt_tokens: z.number().int(), completion_tokens: z.number().int(), total_tokens: z.number().int() }),
});

const chatResponse = completionResponse.extend({
  object: z.literal('chat.completion'),
  choices: z.array(z.looseObject({ index: z.number().int(), message: z.object({ role: z.literal('assistant'), content: z.string() }), finish_reason: z.string().nullable() })),
});

const modelList = z.object({ object: z.literal('list'), data: z.array(z.looseObject({ id: z.string(), object: z.literal('model'), created: z.number().int(), owned_by: z.string() })) });

type Common = { [K in keyof typeof common]?: z.infer<(typeof common)[K]> };

function generationInput(b: Common, maxTokens: number | null | undefined, logprobs: number): Omit<GenerationInput, 'prompt' | 'messages' | 'input_ids'> {
  return {
    max_new_tokens: maxTokens ?? 16,
    temperature: b.temperature ?? 1,
    top_p: b.top_p ?? 1,
    top_k: b.top_k ?? 0,
    seed: b.seed ?? undefined,
    stop: b.stop ?? undefined,
    ignore_eos: b.ignore_eos ?? false,
    repetition_penalty: b.repetition_penalty ?? 1,
    logprobs: logprobs > 0,
    top_logprobs: logprobs,
  };
}

const usageOf = (r: GenerationResult) => ({ prompt_tokens: r.promptTokens, completion_tokens: r.tokens.length, total_tokens: r.promptTokens + r.tokens.length });
const finishOf = (r: GenerationResult) => (r.finishReason === 'cancelled' ? 'length' : r.finishReason);
const created = () => Math.floor(Date.now() / 1000);

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

function chatLogprobs(lps: TokenLogprob[] | undefined, prompt: readonly number[], tokenizer: TextTokenizer) {
  if (!lps) return null;
  const entry = (p: Piece) => ({ token: p.text, logprob: p.logprob, bytes: p.bytes });
  return { content: logprobPieces(tokenizer, prompt, lps).map((p) => ({ ...entry(p), top_logprobs: (p.top ?? []).map(entry) })) };
}

async function streamOpenAI(
  service: GenerationService,
  request: FastifyRequest,
  reply: FastifyReply,
  prepared: PreparedGeneration,
  chunk: (text: string, finish: string | null) => unknown,
  usageChunk: ((r: GenerationResult) => unknown) | null,
): Promise<void> {
  const sse = new SseStream(request, reply);
  try {
    const result = await service.run(request.tenant, prepared, { signal: sse.signal, onToken: (e) => e.text && sse.send(chunk(e.text, null)) });
    sse.send(chunk('', finishOf(result)));
    if (usageChunk) sse.send(usageChunk(result));
    sse.send('[DONE]');
  } catch (err) {
    sse.send({ error: problemOf(toReftError(err)) });
  }
  sse.end();
}

export function openaiRoutes(app: FastifyInstance, service: GenerationService, store: Store): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.post('/v1/completions', {
    schema: { summary: 'OpenAI-compatible text completion', tags: ['openai'], body: completionBody, response: { 200: completionResponse, '4xx': problemSchema, '5xx': problemSchema } },
  }, async (request, reply) => {
    const b = request.body;
    const input = { ...generationInput(b, b.max_tokens, b.logprobs ?? 0), ...(typeof b.prompt === 'string' ? { prompt: b.prompt } : { input_ids: b.prompt }) };
    const prepared = await service.prepare(request.tenant, { name: b.model, field: 'model' }, input, 'cmpl');
    const tokenizer = service.model.tokenizer;
    const base = { id: prepared.id, object: 'text_completion' as const, created: created(), model: b.model };
    if (b.stream) {
      return streamOpenAI(service, request, reply, prepared,
        (text, finish) => ({ ...base, choices: [{ index: 0, text, logprobs: null, finish_reason: finish }] }),
        b.stream_options?.include_usage ? (res) => ({ ...base, choices: [], usage: usageOf(res) }) : null);
    }
    const result = await service.run(request.tenant, prepared, { signal: disconnectSignal(reply) });
    return {
      ...base,
      choices: [{ index: 0, text: result.text, logprobs: completionLogprobs(result.logprobs, prepared.request.tokens, tokenizer), finish_reason: finishOf(result) }],
      usage: usageOf(result),
    };
  });

  r.post('/v1/chat/completions', {
    schema: { summary: 'OpenAI-compatible chat completion', tags: ['openai'], body: chatBody, response: { 200: chatResponse, '4xx': problemSchema, '5xx': problemSchema } },
  }, async (request, reply) => {
    const b = request.body;
    if (b.top_logprobs && !b.logprobs) throw invalidRequest('top_logprobs needs logprobs: true', 'top_logprobs');
    const lp = b.logprobs ? Math.max(b.top_logprobs ?? 0, 0) : 0;
    const input = { ...generationInput(b, b.max_completion_tokens ?? b.max_tokens, lp), messages: b.messages };
    if (b.logprobs) input.logprobs = true;
    const prepared = await service.prepare(request.tenant, { name: b.model, field: 'model' }, input, 'chatcmpl');
    const tokenizer = service.model.tokenizer;
    const base = { id: prepared.id, object: 'chat.completion' as const, created: created(), model: b.model };
    if (b.stream) {
      let first = true;
      return streamOpenAI(service, request, reply, prepared,
        (text, finish) => {
          const delta = first ? { role: 'assistant', content: text } : finish ? {} : { content: text };
          first = false;
          return { ...base, object: 'chat.completion.chunk', choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }] };
        },
        b.stream_options?.include_usage ? (res) => ({ ...base, object: 'chat.completion.chunk', choices: [], usage: usageOf(res) }) : null);
    }
    const result = await service.run(request.tenant, prepared, { signal: disconnectSignal(reply) });
    return {
      ...base,
      choices: [{ index: 0, message: { role: 'assistant' as const, content: result.text }, logprobs: chatLogprobs(result.logprobs, prepared.request.tokens, tokenizer), finish_reason: finishOf(result) }],
      usage: usageOf(result),
    };
  });

  r.get('/v1/models', {
    schema: { summary: 'The base model and the interventions the caller can use', tags: ['openai'], response: { 200: modelList, '4xx': problemSchema } },
  }, async (request) => {
    const data: z.infer<typeof modelList>['data'] = [{ id: service.model.name, object: 'model', created: 0, owned_by: 'reft-server' }];
    let after: string | undefined;
    do {
      const page = await store.listInterventions(request.tenant.id, { limit: 100, after });
      for (const iv of page.data) {
        data.push({ id: iv.id, object: 'model', created: Math.floor(Date.parse(iv.createdAt) / 1000), owned_by: iv.tenantId ? 'tenant' : 'shared', name: iv.name, parent: service.model.name });
      }
      after = page.nextCursor ?? undefined;
    } while (after && data.length < 10_000);
    return { object: 'list' as const, data };
  });
}

