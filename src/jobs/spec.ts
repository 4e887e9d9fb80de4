import { z } from 'zod';
import { jobDataSourceAmbiguous } from '../errors.ts';
import type { ModelConfig } from '../model/config.ts';
import { parseRecipe, recipeSchema, type Recipe } from '../training/index.ts';

/**
 * A training job request, shaped like OpenAI's fine-tuning jobs, and what is stored for it.
 * `intervention` and `hyperparameters` split the trainer's recipe the way users think of it.
 */
const r = recipeSchema.shape;

const interventionRecipeSchema = z.strictObject({
  kind: r.kind,
  rank: r.rank,
  layers: r.layers,
  positions: r.positions,
  share_weights: r.share_weights,
});

const hyperparametersSchema = z.strictObject({
  epochs: r.epochs,
  max_steps: r.max_steps,
  batch_size: r.batch_size,
  gradient_accumulation_steps: r.gradient_accumulation_steps,
  learning_rate: r.learning_rate,
  lr_scheduler: r.lr_scheduler,
  warmup_ratio: r.warmup_ratio,
  weight_decay: r.weight_decay,
  max_grad_norm: r.max_grad_norm,
  dropout: r.dropout,
  seed: r.seed,
});

const MAX_INLINE_ROWS = 10_000;

export const jobRequestSchema = z.strictObject({
  training_file: z.string().min(1).max(128).optional().describe('id of a file uploaded with POST /v1/files'),
  data: z.array(z.unknown()).min(1).max(MAX_INLINE_ROWS).optional().describe('inline rows, when small'),
  intervention: interventionRecipeSchema.default(interventionRecipeSchema.parse({})),
  hyperparameters: hyperparametersSchema.default(hyperparametersSchema.parse({})),
  name: z
    .string()
    .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/, 'must be letters, digits, "_", "." or "-"')
    .refine((s) => !s.includes('..'), 'must not contain ".."')
    .optional(),
  description: z.string().max(4000).optional(),
});

export type JobRequest = z.infer<typeof jobRequestSchema>;

/** What the store keeps: the full recipe (defaults applied) and where the data is. */
export interface JobSpec {
  recipe: Recipe;
  data: { file: string } | { rows: unknown[] };
  name: string | null;
  description: string | null;
}

export function jobSpec(request: JobRequest, model: ModelConfig): JobSpec {
  if ((request.training_file === undefined) === (request.data === undefined)) {
    throw jobDataSourceAmbiguous(request.data ? 'data' : 'training_file');
  }
  const recipe = parseRecipe({ ...request.intervention, ...request.hyperparameters }, model);
  return {
    recipe,
    data: request.training_file !== undefined ? { file: request.training_file } : { rows: request.data! },
    name: request.name ?? null,
    description: request.description ?? null,
  };
}
