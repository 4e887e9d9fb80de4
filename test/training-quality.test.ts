import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StepRunner } from '../src/engine/step-runner.ts';
import type { LowRankIntervention } from '../src/interventions/artifact.ts';
import type { LoadedModel } from '../src/model/load.ts';
import type { RecipeInput } from '../src/training/recipe.ts';
import { Trainer } from '../src/training/trainer.ts';
import { greedyBatch, storiesEngine } from './support/engine.ts';
import { HELD_OUT_OPENINGS, NEW_SENTENCE, TRAIN_OPENINGS } from './support/training-data.ts';

/**
 * Does training teach stories260k what it is shown? Each test trains through the public
 * Trainer and decodes greedily with the inference engine (KV cache, the edit on the prompt
 * only), so it checks the trainer, the artifact and the engine agreeing with each other.
 * A PyTorch reference reached 95–100% held-out over 6 seeds on (a).
 */
let engine: StepRunner;
let model: LoadedModel;

beforeAll(async () => {
  ({ engine, model } = await storiesEngine());
});
afterAll(() => engine?.close());

/** The completion's tokens as training sees them (the joint encoding after the prompt). */
function completionTokens(opening: string, completion: string): number[] {
  const prompt = model.tokenizer.encode(opening);
  return model.tokenizer.encode(opening + completion).slice(prompt.length);
}

/** Greedy continuations of every prompt, decoded together with the KV cache. */
const greedy = (prompts: string[], interventions: readonly LowRankIntervention[], steps: number) =>
  greedyBatch(
    engine,
    prompts.map((p) => ({ tokens: model.tokenizer.encode(p), interventions })),
    steps,
  );

const startsWith = (gen: number[], prefix: number[]) => prefix.every((t, i) => gen[i] === t);

async function train(
  recipe: RecipeInput,
  rows: Array<{ prompt: string; completion: string }>,
): Promise<{ interventions: LowRankIntervention[]; seconds: number; steps: number }> {
  const trainer = await Trainer.create(model, recipe, rows);
  const started = performance.now();
  const outcome = await trainer.train();
  const seconds = (performance.now() - started) / 1000;
  await trainer.release();
  if (outcome.status !== 'completed') throw new Error('training did not complete');
  return { interventions: outcome.artifact.parsed.interventions, seconds, steps: outcome.steps };
}

/** Recipe (a): the brief's; the seeds are the recipe default's neighbours, not picked. */
const RECIPE_A: RecipeInput = {
  rank: 4,
  layers: 'all',
  positions: 'f3+l3',
  epochs: 30,
  learning_rate: 1e-2,
  batch_size: 1,
  lr_scheduler: 'linear',
};
const SEEDS = [1, 2, 3];

async function newSentenceCase(kind: 'loreft' | 'direft'): Promise<void> {
  const target = completionTokens(HELD_OUT_OPENINGS[0], NEW_SENTENCE);
  expect(target.length).toBe(20);
  const base = await greedy([...TRAIN_OPENINGS, ...HELD_OUT_OPENINGS], [], target.length);
  expect(base.filter((g) => startsWith(g, target))).toEqual([]);

  const rows = TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE }));
  for (const seed of SEEDS) {
    const { interventions, seconds, steps } = await train({ ...RECIPE_A, kind, seed }, rows);
    expect(steps).toBe(600);
    const gens = await greedy(HELD_OUT_OPENINGS, interventions, target.length);
    const hits = HELD_OUT_OPENINGS.filter((opening, i) => startsWith(gens[i], completionTokens(opening, NEW_SENTENCE))).length;
    console.log(`${kind} seed ${seed}: ${steps} steps in ${seconds.toFixed(2)} s, held-out ${hits}/20 start with the new sentence`);
    expect(hits / HELD_OUT_OPENINGS.length).toBeGreaterThanOrEqual(0.9);
  }
}

describe('training quality on stories260k', () => {
  it('(a) LoReFT rank 4, all layers, f3+l3: held-out openings continue with the trained sentence', async () => {
    await newSentenceCase('loreft');
  });

  it('(c) DiReFT, same recipe: held-out openings continue with the trained sentence', async () => {
    await newSentenceCase('direft');
  });

  it('(b) LoReFT rank 8 learns 8 different answers for 8 openings', async () => {
    const pairs: Array<[string, string]> = [
      ['Once upon a time, there was a little boy named Tim.', ' He had a pet snake.'],
      ['One day, a girl named Sue went to the park.', ' She found a gold key.'],
      ['There was a big dog who lived in a small house.', ' His name was Spot.'],
      ['Lily liked to draw pictures of the sun.', ' Her pictures were blue.'],
      ['A little bird sat on a tree.', ' It ate a red bug.'],
      ['Tom wanted to bake a cake for his friend.', ' The cake was green.'],
      ['The cat was very sleepy after a long day.', ' It slept in a shoe.'],
      ['Anna had a new doll with a pink dress.', ' The doll could fly.'],
    ];
    const prompts = pairs.map(([p]) => p);
    const targets = pairs.map(([p, c]) => completionTokens(p, c));
    const steps = Math.max(...targets.map((t) => t.length));
    const base = await greedy(prompts, [], steps);
    expect(base.filter((g, i) => startsWith(g, targets[i]))).toEqual([]);

    const rows = pairs.map(([prompt, completion]) => ({ prompt, completion }));
    for (const seed of SEEDS) {
      // 8 rows: 60 epochs (480 steps) rather than the default 30 to learn each one exactly
      const { interventions, seconds } = await train({ rank: 8, layers: 'all', positions: 'f3+l3', epochs: 60, seed }, rows);
      const gens = await greedy(prompts, interventions, steps);
      const hits = targets.filter((t, i) => startsWith(gens[i], t)).length;
      console.log(`8 answers, seed ${seed}: ${seconds.toFixed(2)} s, ${hits}/8 reproduced`);
      expect(hits).toBe(8);
    }
  });
});
