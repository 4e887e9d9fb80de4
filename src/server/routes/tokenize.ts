import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { modelNotFound, tokenOutOfVocabulary } from '../../errors.ts';
import type { Store, Tenant } from '../../storage/store.ts';
import type { GenerationService } from '../generation-service.ts';
import { openaiErrorSchema } from '../openai-error.ts';
import { messageSchema } from '../../prompts/prompt-input.ts';

/**
 * vLLM's /tokenize and /detokenize: the ids a prompt (or chat, template applied) becomes, and
 * the text ids decode to, as the generation routes see them. Errors in the OpenAI shape, as vLLM
 * answers them.
 */
const tokenizeBody = z.union([
  z.strictObject({
    model: z.string().min(1).max(200).optional(),
    prompt: z.string().max(4_000_000),
    add_special_tokens: z.boolean().default(true).describe('add BOS/EOS as the tokenizer config says'),
    return_token_strs: z.boolean().default(false),
  }),
  z.strictObject({
    model: z.string().min(1).max(200).optional(),
    messages: z.array(messageSchema).min(1).max(1024),
    add_generation_prompt: z.boolean().default(true).describe("end with the template's assistant prompt, as chat completions do"),
    return_token_strs: z.boolean().default(false),
  }),
]);

const tokenizeResponse = z.object({
  count: z.number().int(),
  max_model_len: z.number().int(),
  tokens: z.array(z.number().int()),
  token_strs: z.array(z.string().nullable()).nullable(),
});

const detokenizeBody = z.strictObject({
  model: z.string().min(1).max(200).optional(),
  tokens: z.array(z.number().int().min(0)).max(1_000_000),
});

const errors = { '4xx': openaiErrorSchema, '5xx': openaiErrorSchema };
const config = { errorShape: 'openai' as const };

export function tokenizeRoutes(app: FastifyInstance, service: GenerationService, store: Store): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  /** `model` may name the base model, or an intervention or composition the caller can use (tokenization is the same). */
  async function checkModel(tenant: Tenant, model: string | undefined): Promise<void> {
    if (model === undefined || model === service.model.name) return;
    if (!(await store.findIntervention(tenant.id, model)) && !(await store.findComposition(tenant.id, model)))
      throw modelNotFound({ id: model }, 'model');
  }

  r.post(
    '/tokenize',
    {
      config,
      schema: {
        summary: "Token ids of a prompt, or of messages with the chat template applied (vLLM's shape)",
        tags: ['openai'],
        body: tokenizeBody,
        response: { 200: tokenizeResponse, ...errors },
      },
    },
    async (request) => {
      const b = request.body;
      await checkModel(request.tenant, b.model);
      const tokenizer = service.model.tokenizer;
      const tokens =
        'prompt' in b
          ? tokenizer.encode(b.prompt, { addSpecialTokens: b.add_special_tokens })
          : tokenizer.encodeChat(b.messages, { addGenerationPrompt: b.add_generation_prompt });
      return {
        count: tokens.length,
        max_model_len: service.model.config.maxPositions,
        tokens,
        token_strs: b.return_token_strs ? tokens.map((t) => tokenizer.tokenString(t)) : null,
      };
    },
  );

  r.post(
    '/detokenize',
    {
      config,
      schema: {
        summary: "The text token ids decode to (special tokens skipped; vLLM's shape)",
        tags: ['openai'],
        body: detokenizeBody,
        response: { 200: z.object({ prompt: z.string() }), ...errors },
      },
    },
    async (request) => {
      const b = request.body;
      await checkModel(request.tenant, b.model);
      const tokenizer = service.model.tokenizer;
      if (b.tokens.length === 0) return { prompt: '' };
      for (const [i, id] of b.tokens.entries()) {
        if (id >= tokenizer.vocabSize)
          throw tokenOutOfVocabulary({ field: `tokens.${i}`, id, vocabSize: tokenizer.vocabSize }, `tokens.${i}`);
      }
      return { prompt: tokenizer.decode(b.tokens) };
    },
  );
}
