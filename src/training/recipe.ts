import { z } from 'zod';
import { firstIssue, recipeInvalid, recipeLayerOutOfRange, recipeRankTooLarge } from '../errors.ts';
import { INTERVENTION_KINDS, type InterventionSpec } from '../interventions/artifact.ts';
import { parsePositions } from '../interventions/positions.ts';
import type { ModelConfig } from '../model/config.ts';
import { hasRotation } from './kinds.ts';

/**
 * A training recipe, with the names of pyreft's / Hugging Face's TrainingArguments where one
 * exists. Defaults are for the small data sets ReFT is good at (tens to hundreds of rows):
 * - LoReFT rank 4 on every layer at f3+l3 with share_weights false: pyreft's loreft/train.py
 *   defaults for position and sharing; every layer because ReFT on a few layers needs far more
 *   steps to steer a small model.
 * - learning_rate 1e-2, linear decay, no warmup, 30 epochs, batch 1: a rank-4 edit has a few
 *   hundred parameters per layer and Adam's step is ~lr per parameter, so 1e-2 moves the edit
 *   by O(1) in a few hundred steps. pyreft's own tiny-data demos use 4e-3 to 1e-2 (its 7B
 *   runs use ~1e-3 with thousands of rows); 1e-2 is what reaches 90–100% on the memorisation
 *   tests in test/training-quality.test.ts within 600 steps.
 * - weight_decay 0 (TrainingArguments' default), max_grad_norm 1 (its default; clipping the
 *   global norm as Trainer does), AdamW betas 0.9 / 0.999, eps 1e-8.
 */
export const LR_SCHEDULERS = ['linear', 'cosine', 'constant'] as const;

export const recipeSchema = z.strictObject({
  kind: z.enum(INTERVENTION_KINDS).default('loreft'),
  rank: z.number().int().min(1).max(1024).default(4),
  /** Layers to intervene on (0-based), or "all". */
  layers: z.union([z.literal('all'), z.array(z.number().int().min(0)).min(1)]).default('all'),
  positions: z.string().default('f3+l3'),
  /** pyreft's share_weights: false splits fN+lN into an fN and an lN intervention per layer. */
  share_weights: z.boolean().default(false),
  epochs: z.number().int().min(1).max(100_000).default(30),
  /** When set, the run lasts exactly this many optimizer steps (epochs are repeated or cut). */
  max_steps: z.number().int().min(1).optional(),
  batch_size: z.number().int().min(1).max(4096).default(1),
  gradient_accumulation_steps: z.number().int().min(1).max(4096).default(1),
  learning_rate: z.number().positive().max(10).default(1e-2),
  lr_scheduler: z.enum(LR_SCHEDULERS).default('linear'),
  warmup_ratio: z.number().min(0).max(1).default(0),
  weight_decay: z.number().min(0).default(0),
  max_grad_norm: z.number().min(0).default(1),
  adam_beta1: z.number().min(0).lt(1).default(0.9),
  adam_beta2: z.number().min(0).lt(1).default(0.999),
  adam_epsilon: z.number().positive().default(1e-8),
  /** pyreft's intervention dropout on the edited rows during training. */
  dropout: z.number().min(0).lt(1).default(0),
  seed: z
    .number()
    .int()
    .min(0)
    .max(2 ** 32 - 1)
    .default(42),
});

export type Recipe = z.output<typeof recipeSchema>;
export type RecipeInput = z.input<typeof recipeSchema>;

/** Validates a recipe against a model; field names in errors are `recipe.<key>`. */
export function parseRecipe(input: unknown, config: ModelConfig): Recipe {
  const parsed = recipeSchema.safeParse(input ?? {});
  if (!parsed.success) {
    const { field, message } = firstIssue(parsed.error, ['recipe']);
    throw recipeInvalid({ field, problem: message }, field);
  }
  const recipe = parsed.data;
  parsePositions(recipe.positions, 'recipe.positions');
  if (recipe.layers !== 'all') {
    for (const l of recipe.layers) {
      if (l >= config.numLayers) throw recipeLayerOutOfRange({ layer: l, layers: config.numLayers }, 'recipe.layers');
    }
  }
  if (hasRotation(recipe.kind) && recipe.rank > config.hiddenSize) {
    throw recipeRankTooLarge({ rank: recipe.rank, hiddenSize: config.hiddenSize }, 'recipe.rank');
  }
  return recipe;
}

/**
 * The interventions a recipe trains, in artifact order: per layer, one intervention at the
 * recipe's positions, or with share_weights false and fN+lN, one at fN and one at lN
 * (pyreft's split).
 */
export function interventionSpecs(recipe: Recipe, config: ModelConfig): InterventionSpec[] {
  const layers =
    recipe.layers === 'all' ? Array.from({ length: config.numLayers }, (_, i) => i) : [...new Set(recipe.layers)].sort((a, b) => a - b);
  const p = parsePositions(recipe.positions);
  const sides =
    !recipe.share_weights && p.first > 0 && p.last > 0
      ? [
          { first: p.first, last: 0 },
          { first: 0, last: p.last },
        ]
      : [p];
  return layers.flatMap((layer) => sides.map((positions) => ({ kind: recipe.kind, layer, rank: recipe.rank, positions })));
}
