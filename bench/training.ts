import { StepRunner } from '../src/engine/step-runner.ts';
import type { Device } from '../src/runtime/session.ts';
import { Rng } from '../src/rng.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { Trainer, type TrainingExample } from '../src/training/index.ts';
import { NEW_SENTENCE, TRAIN_OPENINGS } from '../test/support/training-data.ts';
import { median, round } from './machine.ts';

/**
 * Issue 4's benchmark: recipe (a) on stories260k (time to finish, training tokens/s), and on
 * the 135M-shape model a training step (batch 8 × 128 tokens, LoReFT rank 8 on 4 layers) next
 * to a forward pass of the same batch.
 */

export async function benchRecipeA(stories: LoadedModel, log: (s: string) => void, device: Device = 'cpu') {
  const rows = TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE }));
  const runs: Array<{ seconds: number; tokensPerSecond: number; steps: number }> = [];
  for (let rep = 0; rep < 3; rep++) {
    let tokensPerSecond = 0;
    const trainer = await Trainer.create(
      stories,
      { rank: 4, layers: 'all', positions: 'f3+l3', epochs: 30, learning_rate: 1e-2, batch_size: 1, lr_scheduler: 'linear', seed: 1 },
      rows,
      {
        device,
        onProgress: (p) => {
          tokensPerSecond = p.tokensPerSecond;
        },
      },
    );
    const t = performance.now();
    const outcome = await trainer.train();
    const seconds = (performance.now() - t) / 1000;
    await trainer.release();
    runs.push({ seconds, tokensPerSecond, steps: outcome.steps });
  }
  const best = runs.reduce((a, b) => (b.seconds < a.seconds ? b : a));
  log(
    `recipe (a) on stories260k (${device}): ${best.steps} steps in ${round(best.seconds, 2)} s, ${round(best.tokensPerSecond)} training tokens/s (PyTorch eager: ~7 s)`,
  );
  return {
    device,
    steps: best.steps,
    seconds: round(best.seconds, 2),
    training_tokens_s: round(best.tokensPerSecond),
    all_seconds: runs.map((r) => round(r.seconds, 2)),
  };
}

export async function benchTrainingStep(model: LoadedModel, engine: StepRunner, log: (s: string) => void) {
  const rng = new Rng(3);
  const examples: TrainingExample[] = Array.from({ length: 8 }, () => ({
    tokens: Array.from({ length: 128 }, () => 1 + Math.floor(rng.next() * (model.config.vocabSize - 1))),
    promptLength: 64,
  }));
  const layers = [3, 10, 17, 24].map((l) => Math.min(l, model.config.numLayers - 1));
  const stepTimes: number[] = [];
  let last = 0;
  const trainer = await Trainer.fromExamples(
    model,
    { kind: 'loreft', rank: 8, layers, positions: 'f7+l7', share_weights: true, batch_size: 8, epochs: 8, seed: 1 },
    examples,
    {
      onProgress: () => {
        const now = performance.now();
        if (last) stepTimes.push(now - last);
        last = now;
      },
    },
  );
  last = performance.now();
  await trainer.train();
  await trainer.release();
  const forwardAll: number[] = [];
  const forwardLast: number[] = [];
  for (let rep = 0; rep < 5; rep++) {
    for (const [allLogits, into] of [
      [true, forwardAll],
      [false, forwardLast],
    ] as const) {
      const t = performance.now();
      const outs = await engine.prefill(examples.map((e) => ({ tokens: e.tokens, allLogits })));
      into.push(performance.now() - t);
      for (const o of outs) engine.release(o.id);
    }
  }
  const step = median(stepTimes);
  const fAll = median(forwardAll);
  const fLast = median(forwardLast);
  log(
    `135M training step (8 × 128 tokens, LoReFT r8 on 4 layers): ${round(step, 1)} ms; forward of the same batch ${round(fAll, 1)} ms with logits at every position (${round(step / fAll, 2)}x), ${round(fLast, 1)} ms with the last position's only (${round(step / fLast, 2)}x)`,
  );
  return {
    step_ms: round(step, 1),
    forward_all_logits_ms: round(fAll, 1),
    forward_last_logit_ms: round(fLast, 1),
    step_vs_forward_all_logits: round(step / fAll, 2),
    step_vs_forward_last_logit: round(step / fLast, 2),
    training_tokens_s: round((8 * 128) / (step / 1000), 1),
  };
}
