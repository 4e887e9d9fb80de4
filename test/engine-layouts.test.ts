import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { randomCheckpoint, type WeightDType } from '../bench/random-checkpoint.ts';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { PrefillInput } from '../src/engine/step-plan.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { parseArtifact } from '../src/interventions/artifact.ts';
import { maxAbsDiff, testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';
import { SMALL_SHAPES } from './support/small-models.ts';

/**
 * The decoder graph's two attention layouts and the architectures and weight types the fixture
 * model doesn't cover, on small random-weight checkpoints: the packed layout (head_dim 16, q/k
 * rotated inside GroupQueryAttention, keys rotated by the engine) must give what the separate
 * layout gives, and half-precision weights what the same values in F32 give.
 */
const base = {
  ...SMALL_SHAPES,
  intermediate_size: 128,
  head_dim: 16,
  max_position_embeddings: 256,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  hidden_act: 'silu',
};
const MODELS: Record<string, Record<string, unknown>> = {
  llama: { ...base, architectures: ['LlamaForCausalLM'], tie_word_embeddings: true },
  qwen2: { ...base, architectures: ['Qwen2ForCausalLM'], tie_word_embeddings: false, rope_scaling: { rope_type: 'linear', factor: 2 } },
  mistral: {
    ...base,
    architectures: ['MistralForCausalLM'],
    tie_word_embeddings: false,
    rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 },
  },
};

const engines: StepRunner[] = [];
afterAll(async () => {
  for (const e of engines) await e.close();
});

async function model(name: string, dtype: WeightDType = 'F32', roundTo?: 'F16' | 'BF16'): Promise<LoadedModel> {
  const dir = await randomCheckpoint(mkdtempSync(join(tmpdir(), `reft-${name}-`)), STORIES, MODELS[name], { dtype, roundTo, seed: 7 });
  return loadModel(dir);
}

async function engine(m: LoadedModel, attention: 'packed' | 'separate', prefillChunkTokens?: number): Promise<StepRunner> {
  const e = await StepRunner.create(m.config, m.checkpoint, { cacheDir: testCacheDir, attention, prefillChunkTokens });
  engines.push(e);
  return e;
}

function batch(m: LoadedModel): PrefillInput[] {
  const iv = (seed: number, layer: number, positions: string) =>
    parseArtifact(
      artifact([randomLoreft(seed, layer, 2, positions, 64, 3)], {}, { hidden_size: 64, num_hidden_layers: 3 }).config,
      artifact([randomLoreft(seed, layer, 2, positions, 64, 3)], {}, { hidden_size: 64, num_hidden_layers: 3 }).weights,
      m.config,
    ).interventions;
  return [
    { tokens: [1, 403, 407, 261, 378], interventions: iv(1, 1, 'l1') },
    { tokens: [1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110], interventions: [...iv(2, 0, 'f2+l2'), ...iv(3, 2, 'f3')] },
    { tokens: [1, 5, 6] },
  ];
}

/** Prefill logits at every position, then 12 greedy steps decoded together; all logits collected. */
async function run(
  e: StepRunner,
  inputs: PrefillInput[],
): Promise<{ prefill: Float32Array[]; decode: Float32Array[][]; tokens: number[][] }> {
  const outs = await e.prefill(inputs.map((x) => ({ ...x, allLogits: true })));
  const vocab = e.config.vocabSize;
  const tokens = outs.map((o) => [argmax(o.logits.subarray(o.logits.length - vocab))]);
  const decode: Float32Array[][] = outs.map(() => []);
  for (let s = 0; s < 12; s++) {
    const logits = await e.decode(new Map(outs.map((o, i) => [o.id, tokens[i].at(-1)!])));
    outs.forEach((o, i) => {
      const l = logits.get(o.id)!;
      decode[i].push(Float32Array.from(l));
      tokens[i].push(argmax(l));
    });
  }
  for (const o of outs) e.release(o.id);
  return { prefill: outs.map((o) => o.logits), decode, tokens };
}

describe('attention layouts agree', () => {
  for (const name of Object.keys(MODELS)) {
    it(`${name}: packed (rotary inside GroupQueryAttention) equals separate, prefill and KV-cached decode`, async () => {
      const m = await model(name);
      const packed = await run(await engine(m, 'packed'), batch(m));
      const separate = await run(await engine(m, 'separate'), batch(m));
      packed.prefill.forEach((p, i) => expect(maxAbsDiff(p, separate.prefill[i]), `row ${i} prefill`).toBeLessThan(1e-4));
      packed.decode.forEach((steps, i) =>
        steps.forEach((p, s) => expect(maxAbsDiff(p, separate.decode[i][s]), `row ${i} step ${s}`).toBeLessThan(1e-4)),
      );
      expect(packed.tokens).toEqual(separate.tokens);
    });
  }
});

describe('chunked prefill in both layouts', () => {
  for (const attention of ['packed', 'separate'] as const) {
    it(`${attention}: prompts run 4 tokens at a time give what one step gives (mistral, llama3 rope)`, async () => {
      const m = await model('mistral');
      const whole = await run(await engine(m, attention), batch(m));
      const chunked = await run(await engine(m, attention, 4), batch(m));
      chunked.prefill.forEach((p, i) => expect(maxAbsDiff(p, whole.prefill[i]), `row ${i} prefill`).toBeLessThan(1e-4));
      chunked.decode.forEach((steps, i) =>
        steps.forEach((p, s) => expect(maxAbsDiff(p, whole.decode[i][s]), `row ${i} step ${s}`).toBeLessThan(1e-4)),
      );
      expect(chunked.tokens).toEqual(whole.tokens);
    });
  }
});

describe('half-precision weights', () => {
  for (const dtype of ['F16', 'BF16'] as const) {
    it(`${dtype} weights give what the same values in F32 give`, async () => {
      const half = await model('mistral', dtype);
      const full = await model('mistral', 'F32', dtype);
      expect([...half.checkpoint.weights.values()][0].dtype).toBe(dtype);
      const a = await run(await engine(half, 'packed'), batch(half));
      const b = await run(await engine(full, 'packed'), batch(full));
      a.prefill.forEach((p, i) => expect(maxAbsDiff(p, b.prefill[i])).toBeLessThan(1e-5));
      expect(a.tokens).toEqual(b.tokens);
    });
  }
});
