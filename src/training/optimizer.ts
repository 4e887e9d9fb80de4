import type { Recipe } from './recipe.ts';

/**
 * The learning-rate schedule and AdamW, with the semantics of Hugging Face's Trainer and
 * torch.optim.AdamW, over the intervention tensors (a few thousand floats: plain loops).
 */

/**
 * The learning rate of optimizer step `step` (0-based) of `total`: linear warmup, then
 * transformers' get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup (half a
 * cycle) / constant. The first step uses the full rate when there is no warmup, the last one
 * lr/total under linear decay.
 */
export function learningRate(recipe: Pick<Recipe, 'learning_rate' | 'lr_scheduler' | 'warmup_ratio'>, step: number, total: number): number {
  const warmup = Math.ceil(total * recipe.warmup_ratio); // as Trainer computes it
  if (step < warmup) return (recipe.learning_rate * step) / Math.max(1, warmup);
  const progress = (step - warmup) / Math.max(1, total - warmup);
  switch (recipe.lr_scheduler) {
    case 'constant':
      return recipe.learning_rate;
    case 'linear':
      return recipe.learning_rate * Math.max(0, 1 - progress);
    case 'cosine':
      return recipe.learning_rate * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
  }
}

export interface AdamWSettings {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

/** One tensor's Adam moments; float32 like torch's, so a checkpoint holds them exactly. */
export interface AdamMoments {
  m: Float32Array;
  v: Float32Array;
}

/**
 * torch.optim.AdamW's update for step t (1-based), in place: decoupled weight decay
 * p ← p·(1 − lr·wd), then p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε).
 */
export function adamwStep(
  param: Float32Array,
  grad: Float32Array,
  moments: AdamMoments,
  t: number,
  lr: number,
  s: AdamWSettings,
  decay: boolean,
): void {
  const { m, v } = moments;
  const bc1 = 1 - s.beta1 ** t;
  const bc2Sqrt = Math.sqrt(1 - s.beta2 ** t);
  const stepSize = lr / bc1;
  const shrink = decay ? 1 - lr * s.weightDecay : 1;
  for (let i = 0; i < param.length; i++) {
    const g = grad[i];
    m[i] = s.beta1 * m[i] + (1 - s.beta1) * g;
    v[i] = s.beta2 * v[i] + (1 - s.beta2) * g * g;
    param[i] = param[i] * shrink - (stepSize * m[i]) / (Math.sqrt(v[i]) / bc2Sqrt + s.eps);
  }
}

/** Scales gradients so their global L2 norm is at most `maxNorm` (Trainer's clip_grad_norm_); returns the norm before clipping. */
export function clipGradNorm(grads: readonly Float32Array[], maxNorm: number): number {
  let sq = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) sq += g[i] * g[i];
  const norm = Math.sqrt(sq);
  if (maxNorm > 0 && norm > maxNorm) {
    // torch: clip_coef = max_norm / (total_norm + 1e-6)
    const c = maxNorm / (norm + 1e-6);
    for (const g of grads) for (let i = 0; i < g.length; i++) g[i] *= c;
  }
  return norm;
}
