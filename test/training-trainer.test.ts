import { beforeAll, describe, expect, it } from 'vitest';
import { orthonormalityError, parseArtifact } from '../src/interventions/artifact.ts';
import { formatPositions } from '../src/interventions/positions.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import type { ChatMessage, TextTokenizer } from '../src/model/tokenizer.ts';
import { decodeCheckpoint, encodeCheckpoint, type TrainingCheckpoint } from '../src/training/checkpoint.ts';
import { tokenizeRows } from '../src/training/data.ts';
import { initialTensors } from '../src/training/kinds.ts';
import { adamwStep, clipGradNorm, learningRate } from '../src/training/optimizer.ts';
import { retractRows } from '../src/training/orthogonal.ts';
import { interventionSpecs, parseRecipe, type RecipeInput } from '../src/training/recipe.ts';
import { Rng } from '../src/rng.ts';
import { Trainer, type TrainingProgress } from '../src/training/trainer.ts';
import { stepBytes } from '../src/training/memory.ts';
import { STORIES } from './support/fixtures.ts';
import { thrownBy } from './support/errors.ts';

let model: LoadedModel;
beforeAll(async () => {
  model = await loadModel(STORIES);
});

const D = 64;
const ROWS = [
  { prompt: 'Once upon a time, there was a little boy named Tim.', completion: ' He had a pet snake.' },
  { prompt: 'One day, a girl named Sue went to the park.', completion: ' She found a gold key.' },
  { prompt: 'There was a big dog who lived in a small house.', completion: ' His name was Spot.' },
  { prompt: 'Lily liked to draw pictures.', completion: ' Her pictures were blue.' },
  { prompt: 'A little bird sat on a tree.', completion: ' It ate a red bug.' },
];

describe('initialisation (pyreft)', () => {
  it('LoReFT: R has orthonormal rows, W and b are U(−1/√d, 1/√d); the same seed gives the same tensors', () => {
    const a = initialTensors('loreft', 4, D, new Rng(5));
    const b = initialTensors('loreft', 4, D, new Rng(5));
    const c = initialTensors('loreft', 4, D, new Rng(6));
    expect(orthonormalityError(a.rotate, 4, D)).toBeLessThan(1e-6);
    const bound = 1 / Math.sqrt(D);
    for (const name of ['source.weight', 'source.bias']) {
      expect(a[name].every((x) => Math.abs(x) <= bound)).toBe(true);
      expect(Math.max(...a[name].map(Math.abs))).toBeGreaterThan(bound * 0.5); // spread over the range
    }
    for (const k of Object.keys(a)) expect(a[k]).toEqual(b[k]);
    expect(a.rotate).not.toEqual(c.rotate);
  });

  it('DiReFT: W1, b and W2 (nn.Linear(d, r) weights, [r, d]) are uniform in ±1/√d; consreft bias is U(0, 1)', () => {
    const t = initialTensors('direft', 4, D, new Rng(1));
    expect(Object.keys(t).sort()).toEqual(['proj.weight', 'source.bias', 'source.weight']);
    expect(t['proj.weight'].length).toBe(4 * D);
    expect(t['proj.weight'].every((x) => Math.abs(x) <= 1 / Math.sqrt(D))).toBe(true);
    const cons = initialTensors('consreft', 2, D, new Rng(1));
    expect(cons['source.bias'].every((x) => x >= 0 && x < 1)).toBe(true);
    expect(orthonormalityError(cons.rotate, 2, D)).toBeLessThan(1e-6);
  });

  it('the QR retraction restores orthonormal rows and keeps an orthonormal R as it is', () => {
    const r = initialTensors('loreft', 4, D, new Rng(2)).rotate;
    const kept = r.slice();
    retractRows(kept, 4, D);
    for (let i = 0; i < r.length; i++) expect(Math.abs(kept[i] - r[i])).toBeLessThan(1e-6);
    const rng = new Rng(3);
    const moved = r.map((x) => x + 0.05 * rng.normal());
    expect(orthonormalityError(moved, 4, D)).toBeGreaterThan(1e-2);
    retractRows(moved, 4, D);
    expect(orthonormalityError(moved, 4, D)).toBeLessThan(1e-6);
  });
});

describe('recipe', () => {
  it('defaults: LoReFT rank 4 on every layer at f3+l3, split into f3 and l3 interventions (share_weights false)', () => {
    const r = parseRecipe({}, model.config);
    expect(r).toMatchObject({
      kind: 'loreft',
      rank: 4,
      layers: 'all',
      positions: 'f3+l3',
      share_weights: false,
      epochs: 30,
      learning_rate: 1e-2,
      batch_size: 1,
      lr_scheduler: 'linear',
    });
    const specs = interventionSpecs(r, model.config);
    expect(specs.map((s) => `${s.layer}:${formatPositions(s.positions)}`)).toEqual([
      '0:f3',
      '0:l3',
      '1:f3',
      '1:l3',
      '2:f3',
      '2:l3',
      '3:f3',
      '3:l3',
      '4:f3',
      '4:l3',
    ]);
    const shared = interventionSpecs(parseRecipe({ share_weights: true, layers: [4, 1] }, model.config), model.config);
    expect(shared.map((s) => `${s.layer}:${formatPositions(s.positions)}`)).toEqual(['1:f3+l3', '4:f3+l3']);
  });

  it('rejects bad recipes naming the field', () => {
    const refusal = (input: Record<string, unknown>) => thrownBy(() => parseRecipe(input, model.config));
    expect(refusal({ layers: [5] })).toMatchObject({ code: 'recipe_layer_out_of_range', field: 'recipe.layers' });
    expect(refusal({ positions: 'x3' })).toMatchObject({ code: 'positions_invalid', field: 'recipe.positions' });
    expect(refusal({ rank: 65 })).toMatchObject({ code: 'recipe_rank_too_large', field: 'recipe.rank' });
    expect(refusal({ dropout: 1 })).toMatchObject({ code: 'recipe_invalid', field: 'recipe.dropout' });
    expect(refusal({ lr: 1 })).toMatchObject({ code: 'recipe_invalid', field: 'recipe.lr' });
  });
});

describe('optimizer', () => {
  it('linear and cosine schedules with warmup follow transformers', () => {
    const base = { learning_rate: 0.1, warmup_ratio: 0 };
    expect(learningRate({ ...base, lr_scheduler: 'linear' }, 0, 10)).toBeCloseTo(0.1);
    expect(learningRate({ ...base, lr_scheduler: 'linear' }, 9, 10)).toBeCloseTo(0.01);
    expect(learningRate({ ...base, lr_scheduler: 'cosine' }, 5, 10)).toBeCloseTo(0.05);
    expect(learningRate({ ...base, lr_scheduler: 'constant' }, 9, 10)).toBeCloseTo(0.1);
    const warm = { learning_rate: 0.1, warmup_ratio: 0.2, lr_scheduler: 'linear' as const }; // ceil(2) warmup steps
    expect([0, 1, 2, 6].map((s) => learningRate(warm, s, 10))).toEqual([0, 0.05, 0.1, 0.05].map((x) => expect.closeTo(x, 12)));
  });

  it('AdamW matches torch.optim.AdamW step by step (decoupled decay, bias correction)', () => {
    const s = { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1 };
    const p = Float32Array.of(0.5, -1);
    const moments = { m: new Float32Array(2), v: new Float32Array(2) };
    // float64 reference of torch's update
    const ref = [0.5, -1];
    const m = [0, 0];
    const v = [0, 0];
    const grads = [
      [0.1, -0.2],
      [0.3, 0.1],
      [-0.05, 0.4],
    ];
    grads.forEach((g, k) => {
      const t = k + 1;
      const lr = 0.01;
      adamwStep(p, Float32Array.from(g), moments, t, lr, s, true);
      for (let i = 0; i < 2; i++) {
        ref[i] *= 1 - lr * s.weightDecay;
        m[i] = 0.9 * m[i] + 0.1 * g[i];
        v[i] = 0.999 * v[i] + 0.001 * g[i] ** 2;
        ref[i] -= (lr / (1 - 0.9 ** t)) * (m[i] / (Math.sqrt(v[i]) / Math.sqrt(1 - 0.999 ** t) + 1e-8));
      }
    });
    expect(Math.abs(p[0] - ref[0])).toBeLessThan(1e-6);
    expect(Math.abs(p[1] - ref[1])).toBeLessThan(1e-6);
  });

  it('global-norm clipping as clip_grad_norm_', () => {
    const a = Float32Array.of(3, 0);
    const b = Float32Array.of(4);
    expect(clipGradNorm([a, b], 1)).toBeCloseTo(5);
    expect(Math.hypot(a[0], b[0])).toBeCloseTo(1, 5);
  });
});

/** A stand-in tokenizer with a chat template: messages render as "<role>:content|". */
function chatTokenizer(): TextTokenizer {
  const encodeText = (s: string) => [...s].map((c) => c.charCodeAt(0) % 500);
  const render = (messages: ChatMessage[], gen: boolean) =>
    messages.map((m) => `<${m.role}>${m.content}|`).join('') + (gen ? '<assistant>' : '');
  return {
    vocabSize: 512,
    bosTokenId: 1,
    eosTokenIds: [2],
    hasChatTemplate: true,
    encode: (s: string) => [1, ...encodeText(s)],
    encodeChat: (m: ChatMessage[], o?: { addGenerationPrompt?: boolean }) => [1, ...encodeText(render(m, o?.addGenerationPrompt ?? false))],
    decode: () => '',
    createStreamDecoder: () => ({ push: () => '', flush: () => '' }),
  } as unknown as TextTokenizer;
}

describe('training data', () => {
  it('{prompt, completion}: the prompt as encoded alone, then the joint encoding with EOS appended (pyreft)', () => {
    const [e] = tokenizeRows([{ prompt: 'Once upon a time', completion: ' there was' }], model.tokenizer, 512);
    expect(e.promptLength).toBe(5);
    expect(e.tokens).toEqual([...model.tokenizer.encode('Once upon a time there was'), 2]);
  });

  it('{messages}: the chat template, scoring only the last assistant turn', () => {
    const tok = chatTokenizer();
    const messages = [
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'yo' },
      { role: 'user', content: 'name?' },
      { role: 'assistant', content: 'Tim' },
    ];
    const [e] = tokenizeRows([{ messages }], tok, 512);
    const prompt = tok.encodeChat(messages.slice(0, 3), { addGenerationPrompt: true });
    expect(e.promptLength).toBe(prompt.length);
    expect(e.tokens).toEqual([...tok.encodeChat(messages), 2]);
    expect(thrownBy(() => tokenizeRows([{ messages: messages.slice(0, 3) }], tok, 512))).toMatchObject({
      code: 'training_row_invalid',
      field: 'data.0.messages',
    });
  });

  it('rejects empty data and prompts longer than the context', () => {
    expect(thrownBy(() => tokenizeRows([], model.tokenizer, 512))).toMatchObject({ code: 'training_data_empty', field: 'data' });
    expect(thrownBy(() => tokenizeRows([{ prompt: 'Once upon a time', completion: '!' }], model.tokenizer, 5))).toMatchObject({
      code: 'training_prompt_too_long',
      field: 'data.0',
    });
  });
});

describe('trainer', () => {
  const small: RecipeInput = {
    rank: 2,
    layers: [1, 4],
    positions: 'f2+l2',
    max_steps: 12,
    batch_size: 2,
    dropout: 0.1,
    seed: 9,
    warmup_ratio: 0.1,
  };

  async function run(recipe: RecipeInput, opts: Parameters<typeof Trainer.create>[3] = {}) {
    const trainer = await Trainer.create(model, recipe, ROWS, opts);
    try {
      return { trainer, outcome: await trainer.train() };
    } finally {
      await trainer.release();
    }
  }

  it('reports progress every step, keeps R orthonormal throughout, and produces a valid reft/v1 artifact', async () => {
    const events: TrainingProgress[] = [];
    let worst = 0;
    let trainer!: Trainer;
    trainer = await Trainer.create(model, small, ROWS, {
      artifact: { name: 'snakes', metadata: { source: 'test' } },
      onProgress: (p) => {
        events.push(p);
        for (const iv of trainer.interventions()) worst = Math.max(worst, orthonormalityError(iv.up, iv.rank, D));
      },
    });
    const outcome = await trainer.train();
    await trainer.release();
    expect(outcome.status).toBe('completed');
    expect(events.map((e) => e.step)).toEqual(Array.from({ length: 12 }, (_, i) => i + 1));
    for (const e of events) {
      expect(e.totalSteps).toBe(12);
      expect(Number.isFinite(e.loss) && e.loss > 0).toBe(true);
      expect(e.tokensPerSecond).toBeGreaterThan(0);
      expect(e.etaSeconds).toBeGreaterThanOrEqual(0);
    }
    expect(events[0].learningRate).toBe(0); // ceil(1.2) = 2 warmup steps
    expect(events[2].learningRate).toBeCloseTo(1e-2);
    expect(events[2].epoch).toBeCloseTo(1); // 5 rows, batch 2: 3 steps per epoch
    expect(worst).toBeLessThan(1e-5);
    if (outcome.status !== 'completed') return;
    const parsed = parseArtifact(outcome.artifact.configJson, outcome.artifact.weights, { hiddenSize: D, numLayers: 5 });
    expect(parsed.config.name).toBe('snakes');
    expect(parsed.config.metadata).toEqual({ source: 'test' });
    expect(parsed.config.interventions.map((iv) => `${iv.kind}:${iv.layer}:${iv.positions}`)).toEqual([
      'loreft:1:f2',
      'loreft:1:l2',
      'loreft:4:f2',
      'loreft:4:l2',
    ]);
  });

  it('the loss goes down', async () => {
    const losses: number[] = [];
    await run({ rank: 4, layers: 'all', epochs: 10, seed: 3 }, { onProgress: (p) => losses.push(p.loss) });
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(losses.slice(-5))).toBeLessThan(0.5 * mean(losses.slice(0, 5)));
  });

  it('is deterministic: same seed, same artifact bytes; another seed differs', async () => {
    const a = await run(small);
    const b = await run(small);
    const c = await run({ ...small, seed: 10 });
    if (a.outcome.status !== 'completed' || b.outcome.status !== 'completed' || c.outcome.status !== 'completed')
      throw new Error('not completed');
    expect(Buffer.from(a.outcome.artifact.weights).equals(Buffer.from(b.outcome.artifact.weights))).toBe(true);
    expect(Buffer.from(a.outcome.artifact.weights).equals(Buffer.from(c.outcome.artifact.weights))).toBe(false);
  });

  it('cancellation returns a checkpoint; resuming from it gives the uninterrupted result bit for bit', async () => {
    const full = await run(small);
    const abort = new AbortController();
    const first = await run(small, { signal: abort.signal, onProgress: (p) => p.step === 5 && abort.abort() });
    expect(first.outcome.status).toBe('cancelled');
    if (first.outcome.status !== 'cancelled' || full.outcome.status !== 'completed') throw new Error('unexpected outcomes');
    expect(first.outcome.steps).toBe(5);
    const saved = encodeCheckpoint(first.outcome.checkpoint); // through bytes, as a job store would
    const resumed = await run(small, { resumeFrom: decodeCheckpoint(saved) });
    if (resumed.outcome.status !== 'completed') throw new Error('resume did not complete');
    expect(resumed.outcome.steps).toBe(12);
    expect(Buffer.from(resumed.outcome.artifact.weights).equals(Buffer.from(full.outcome.artifact.weights))).toBe(true);
  });

  it('a killed job resumes from its last periodic checkpoint to the same result', async () => {
    const full = await run(small);
    const checkpoints: Uint8Array[] = [];
    const abort = new AbortController();
    await run(small, {
      signal: abort.signal,
      checkpointEvery: 4,
      onCheckpoint: (c) => void checkpoints.push(encodeCheckpoint(c)),
      onProgress: (p) => p.step === 7 && abort.abort(), // "killed" at 7: its own cancellation state is dropped
    });
    expect(checkpoints.length).toBe(1);
    const last: TrainingCheckpoint = decodeCheckpoint(checkpoints.at(-1)!);
    expect(last.step).toBe(4);
    const resumed = await run(small, { resumeFrom: last });
    if (resumed.outcome.status !== 'completed' || full.outcome.status !== 'completed') throw new Error('not completed');
    expect(Buffer.from(resumed.outcome.artifact.weights).equals(Buffer.from(full.outcome.artifact.weights))).toBe(true);
  });

  it('refuses to resume with another recipe', async () => {
    const abort = new AbortController();
    const first = await run(small, { signal: abort.signal, onProgress: () => abort.abort() });
    if (first.outcome.status !== 'cancelled') throw new Error('not cancelled');
    await expect(Trainer.create(model, { ...small, seed: 1 }, ROWS, { resumeFrom: first.outcome.checkpoint })).rejects.toMatchObject({
      code: 'checkpoint_mismatch',
      field: 'resume_from',
    });
  });

  it('gradient accumulation over micro-batches of 1 equals one batch of 2 (token-weighted mean)', async () => {
    const common: RecipeInput = { rank: 2, layers: [0, 3], max_steps: 6, seed: 4, kind: 'direft' };
    const batched = await run({ ...common, batch_size: 2 });
    const accumulated = await run({ ...common, batch_size: 1, gradient_accumulation_steps: 2 });
    if (batched.outcome.status !== 'completed' || accumulated.outcome.status !== 'completed') throw new Error('not completed');
    const a = batched.outcome.artifact.parsed.interventions;
    const b = accumulated.outcome.artifact.parsed.interventions;
    let worst = 0;
    a.forEach((iv, i) => iv.down.forEach((x, k) => (worst = Math.max(worst, Math.abs(x - b[i].down[k])))));
    expect(worst).toBeLessThan(1e-4);
  });

  it('a batch the memory plan splits into micro-batches trains as the unsplit batch (loss and tensors within 1e-5)', async () => {
    const recipe: RecipeInput = { rank: 2, layers: [0, 3], max_steps: 4, seed: 9, kind: 'loreft', batch_size: ROWS.length };
    const longest = Math.max(...tokenizeRows(ROWS, model.tokenizer, model.config.maxPositions).map((e) => e.tokens.length));
    // room for two rows of the longest length: the batch of 5 runs as 3 passes
    const budget = stepBytes(model.config, 2, longest);
    const progress = { whole: [] as TrainingProgress[], split: [] as TrainingProgress[] };
    const whole = await run(recipe, { onProgress: (p) => progress.whole.push(p) });
    const split = await run(recipe, { memoryBudget: budget, onProgress: (p) => progress.split.push(p) });
    if (whole.outcome.status !== 'completed' || split.outcome.status !== 'completed') throw new Error('not completed');
    expect(progress.whole.map((p) => p.microBatches)).toEqual([1, 1, 1, 1]);
    expect(progress.split.map((p) => p.microBatches)).toEqual([3, 3, 3, 3]);
    progress.whole.forEach((p, i) => {
      expect(Math.abs(p.loss - progress.split[i].loss)).toBeLessThan(1e-5);
      expect(Math.abs(p.gradNorm - progress.split[i].gradNorm)).toBeLessThan(1e-5);
    });
    const a = whole.outcome.artifact.parsed.interventions;
    const b = split.outcome.artifact.parsed.interventions;
    let worst = 0;
    a.forEach((iv, i) => {
      for (const name of ['down', 'bias', 'up'] as const)
        iv[name].forEach((x, k) => (worst = Math.max(worst, Math.abs(x - b[i][name][k]))));
    });
    expect(worst).toBeLessThan(1e-5);
    expect(split.outcome.steps).toBe(4);
  });

  it('refuses data whose longest row alone exceeds the memory budget, naming the limit', async () => {
    await expect(Trainer.create(model, small, ROWS, { memoryBudget: 1024 })).rejects.toMatchObject({
      code: 'training_memory_exceeded',
      category: 'payload_too_large',
      field: 'data',
    });
  });
});
