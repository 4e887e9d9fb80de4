import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { GenerationResult, TokenLogprob } from '../../engine/generation.ts';
import {
  choicesTooMany,
  logitBiasTooLarge,
  maxTokensOverContext,
  modelNotFound,
  parameterUnsupported,
  tokenOutOfVocabulary,
  topLogprobsWithoutLogprobs,
} from '../../errors.ts';
import type { TextTokenizer } from '../../model/tokenizer.ts';
import type { Composition, InterventionMeta, Store, Tenant } from '../../storage/store.ts';
import type { GenerationInput, GenerationService, PreparedGeneration } from '../generation-service.ts';
import { logprobPieces, type Piece } from '../logprob-pieces.ts';
import { openaiErrorOf, openaiErrorSchema } from '../openai-error.ts';
import { toReftError } from '../problem.ts';
import { messageSchema, samplingFields } from '../protocol.ts';
import { SseStream } from '../sse.ts';
import { grammarSpecOf, structuredOutputFields } from '../structured-output.ts';
import { appliedFields, disconnectSignal } from './generate.ts';
import { returnCoefficientsField, steerListSchema } from './steer-schemas.ts';

/**
 * OpenAI-compatible completions, chat completions and model listing, so existing clients
 * (the official SDKs) work unchanged. `model` names an intervention (name or id) or the base
 * model. Fields OpenAI defines but this server can't honour are refused by name, not ignored.
 */

/** Choices one request may ask for (prompts × n): each is a row of the batch. */
const MAX_CHOICES = 16;
const MAX_LOGIT_BIAS = 1024;

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
};

const tokenIds = z.array(z.number().int().min(0)).min(1).max(1_000_000);
const completionBody = z.strictObject({
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

const chatBody = z.strictObject({
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

const usageSchema = z.object({ prompt_tokens: z.number().int(), completion_tokens: z.number().int(), total_tokens: z.number().int() });

const completionResponse = z.looseObject({
  id: z.string(),
  object: z.literal('text_completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(z.looseObject({ index: z.number().int(), text: z.string(), finish_reason: z.string().nullable() })),
  usage: usageSchema,
});

const chatResponse = completionResponse.extend({
  object: z.literal('chat.completion'),
  choices: z.array(
    z.looseObject({
      index: z.number().int(),
      message: z.object({ role: z.literal('assistant'), content: z.string() }),
      finish_reason: z.string().nullable(),
    }),
  ),
});

const modelSchema = z.looseObject({
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
const modelList = z.object({ object: z.literal('list'), data: z.array(modelSchema) });

/** The routes' error responses, in OpenAI's shape. */
const errors = { '4xx': openaiErrorSchema, '5xx': openaiErrorSchema };
const config = { errorShape: 'openai' as const };

type Common = { [K in keyof typeof common]?: z.infer<(typeof common)[K]> };

/** Refuses a field this server can't honour, by name; `harmless` values ask for nothing. */
function refuseUnsupported(body: Record<string, unknown>, fields: readonly string[]): void {
  for (const f of fields) {
    const v = body[f];
    const harmless =
      v === undefined || v === null || v === false || (Array.isArray(v) && v.length === 0) || (f === 'tool_choice' && v === 'none');
    if (!harmless) throw parameterUnsupported({ name: f }, f);
  }
}

function logitBias(bias: Record<string, number> | null | undefined, vocabSize: number): Array<[number, number]> | undefined {
  if (!bias) return undefined;
  const entries = Object.entries(bias);
  if (entries.length > MAX_LOGIT_BIAS) throw logitBiasTooLarge({ entries: entries.length, limit: MAX_LOGIT_BIAS }, 'logit_bias');
  return entries.map(([k, v]) => {
    const id = Number(k);
    if (id >= vocabSize) throw tokenOutOfVocabulary({ field: `logit_bias.${k}`, id: k, vocabSize }, `logit_bias.${k}`);
    return [id, v];
  });
}

function generationInput(
  b: Common,
  maxTokens: number | null | undefined,
  logprobs: number,
  vocabSize: number,
): Omit<GenerationInput, 'prompt' | 'messages' | 'input_ids'> {
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
    frequency_penalty: b.frequency_penalty ?? 0,
    presence_penalty: b.presence_penalty ?? 0,
    logit_bias: logitBias(b.logit_bias, vocabSize),
  };
}

/**
 * An explicit max_tokens the context can't hold is refused (rather than silently cut short);
 * the default is only capped by the context.
 */
function checkMaxTokens(
  prepared: PreparedGeneration,
  maxTokens: { value: number | null | undefined; field: string },
  context: number,
): void {
  const promptTokens = prepared.request.tokens.length;
  if (maxTokens.value != null && promptTokens + maxTokens.value > context) {
    throw maxTokensOverContext({ context, promptTokens, field: maxTokens.field, asked: maxTokens.value }, maxTokens.field);
  }
}

/** What a request applies: `model` (an intervention, a composition or the base model) or `interventions`. */
function steeringOf(b: Common) {
  return { name: b.model, field: 'model', items: b.interventions, returnCoefficients: b.return_coefficients ?? false };
}

/** The rows of a request: each prompt `n` times, choice i of a prompt sampling with seed + i. */
function choicesOf(prompts: PreparedGeneration[], n: number): PreparedGeneration[] {
  return prompts.flatMap((p) =>
    Array.from({ length: n }, (_, i) => {
      const seed = p.request.sampling.seed;
      return i === 0 || seed === undefined
        ? p
        : { ...p, request: { ...p.request, sampling: { ...p.request.sampling, seed: (seed + i) % 2 ** 32 } } };
    }),
  );
}

function usageOf(results: GenerationResult[], n: number) {
  // each prompt counts once, as OpenAI counts it, however many choices it has
  const prompt = results.filter((_, i) => i % n === 0).reduce((sum, r) => sum + r.promptTokens, 0);
  const completion = results.reduce((sum, r) => sum + r.tokens.length, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

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
  rows: PreparedGeneration[],
  chunk: (index: number, text: string, finish: string | null, applied?: object) => unknown,
  usageChunk: ((results: GenerationResult[]) => unknown) | null,
): Promise<void> {
  const sse = new SseStream(request, reply);
  const tokenizer = service.model.tokenizer;
  try {
    const results = await service.runAll(request.tenant, rows, {
      signal: sse.signal,
      onToken: (i, e) => {
        if (e.applied) sse.send(chunk(i, e.text, null, appliedFields(rows[i], e.applied, tokenizer)));
        else if (e.text) sse.send(chunk(i, e.text, null));
      },
    });
    results.forEach((r, i) => sse.send(chunk(i, '', finishOf(r))));
    if (usageChunk) sse.send(usageChunk(results));
    sse.send('[DONE]');
  } catch (err) {
    sse.send(openaiErrorOf(toReftError(err)));
  }
  sse.end();
}

type CompletionPrompt = z.infer<typeof completionBody>['prompt'];

/** One prompt or several: a list of strings or a list of token-id lists is several. */
function promptList(prompt: CompletionPrompt): Array<string | number[]> {
  if (typeof prompt === 'string') return [prompt];
  if (typeof prompt[0] === 'number') return [prompt as number[]];
  return prompt as Array<string | number[]>;
}

export function openaiRoutes(app: FastifyInstance, service: GenerationService, store: Store): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  r.post(
    '/v1/completions',
    {
      config,
      schema: {
        summary: 'OpenAI-compatible text completion',
        tags: ['openai'],
        body: completionBody,
        response: { 200: completionResponse, ...errors },
      },
    },
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
          const started = new Set<number>();
          return streamOpenAI(
            service,
            request,
            reply,
            rows,
            (index, text, finish, applied) => {
              // the echoed prompt leads each choice's first chunk
              if (!started.has(index)) {
                started.add(index);
                text = echo(index) + text;
              }
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

  r.post(
    '/v1/chat/completions',
    {
      config,
      schema: {
        summary: 'OpenAI-compatible chat completion',
        tags: ['openai'],
        body: chatBody,
        response: { 200: chatResponse, ...errors },
      },
    },
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
          const started = new Set<number>();
          return streamOpenAI(
            service,
            request,
            reply,
            rows,
            (index, text, finish, applied) => {
              const delta = !started.has(index) ? { role: 'assistant', content: text } : finish ? {} : { content: text };
              started.add(index);
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

  const baseModel = (): z.infer<typeof modelSchema> => {
    const rt = service.model;
    return {
      id: rt.name,
      object: 'model',
      created: 0,
      owned_by: 'reft-server',
      root: rt.name,
      parent: null,
      max_model_len: rt.config.maxPositions,
      weights: { format: rt.engine.weights.format, bytes: rt.engine.weights.bytes },
    };
  };
  const interventionModel = (iv: InterventionMeta): z.infer<typeof modelSchema> => ({
    id: iv.name,
    object: 'model',
    created: Math.floor(Date.parse(iv.createdAt) / 1000),
    owned_by: iv.tenantId ? 'tenant' : 'shared',
    root: iv.id,
    parent: service.model.name,
  });

  const compositionModel = (c: Composition): z.infer<typeof modelSchema> => ({
    id: c.name,
    object: 'model',
    created: Math.floor(Date.parse(c.createdAt) / 1000),
    owned_by: 'tenant',
    root: c.id,
    parent: service.model.name,
  });

  r.get(
    '/v1/models',
    {
      config,
      schema: {
        summary: 'The base model, then the interventions and compositions the caller can use, by name',
        tags: ['openai'],
        response: { 200: modelList, ...errors },
      },
    },
    async (request) => {
      const data = [baseModel()];
      let after: string | undefined;
      do {
        const page = await store.listInterventions(request.tenant.id, { limit: 100, after });
        data.push(...page.data.map(interventionModel));
        after = page.nextCursor ?? undefined;
      } while (after && data.length < 10_000);
      let next: string | undefined;
      do {
        const page = await store.listCompositions(request.tenant.id, { limit: 100, after: next });
        data.push(...page.data.map(compositionModel));
        next = page.nextCursor ?? undefined;
      } while (next && data.length < 20_000);
      return { object: 'list' as const, data };
    },
  );

  // the base model's name may hold slashes (a hub repo id), hence the wildcard
  r.get(
    '/v1/models/*',
    {
      config,
      schema: {
        summary: 'One model: the base model, or an intervention or composition by name or id',
        tags: ['openai'],
        params: z.object({ '*': z.string().min(1).max(400).describe('model name') }),
        response: { 200: modelSchema, ...errors },
      },
    },
    async (request) => modelByName(request.params['*'], request.tenant),
  );

  async function modelByName(name: string, tenant: Tenant): Promise<z.infer<typeof modelSchema>> {
    if (name === service.model.name) return baseModel();
    const iv = await store.findIntervention(tenant.id, name);
    if (iv) return interventionModel(iv);
    const composition = await store.findComposition(tenant.id, name);
    if (!composition) throw modelNotFound({ id: name }, 'model');
    return compositionModel(composition);
  }
}
