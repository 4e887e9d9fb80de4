import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { randomCheckpoint } from '../bench/random-checkpoint.ts';
import { StepRunner } from '../src/engine/step-runner.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { DECODE_ATTENTION_MIN_CAPACITY } from '../src/graph/decoder.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { maxAbsDiff, testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';
import { GEMMA2_FIELDS, SMALL_SHAPES } from './support/small-models.ts';

/**
 * A decode step over a past of DECODE_ATTENTION_MIN_CAPACITY slots or more attends in plain
 * operators (src/graph/decoder.ts, decodeAttention), shorter ones and every prompt in
 * GroupQueryAttention: decoding across that boundary must give what recomputing the whole
 * sequence (GQA) gives, for each architecture's attention (grouped heads, packed and separate
 * projections, per-head q/k norms, scale, soft-cap, sliding window), with rows of different
 * lengths in one batch.
 */
const base = {
  ...SMALL_SHAPES,
  intermediate_size: 96,
  head_dim: 16,
  max_position_embeddings: 512,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  tie_word_embeddings: true,
};
const MODELS: Record<string, { config: Record<string, unknown>; layouts: Array<'packed' | 'separate'> }> = {
  llama: { config: { ...base, architectures: ['LlamaForCausalLM'], hidden_act: 'silu' }, layouts: ['packed', 'separate'] },
  qwen3: {
    config: { ...base, architectures: ['Qwen3ForCausalLM'], model_type: 'qwen3', head_dim: 32, hidden_act: 'silu', attention_bias: false },
    layouts: ['separate'],
  },
  gemma2: {
    config: {
      ...base,
      ...GEMMA2_FIELDS,
      sliding_window: 4,
    },
    layouts: ['packed', 'separate'],
  },
};

const engines: StepRunner[] = [];
afterAll(async () => {
  for (const e of engines) await e.close();
});

async function model(name: string): Promise<LoadedModel> {
  const dir = mkdtempSync(join(tmpdir(), `reft-decode-${name}-`));
  return loadModel(await randomCheckpoint(dir, STORIES, MODELS[name].config, { seed: 3 }));
}

async function engine(m: LoadedModel, attention: 'packed' | 'separate', prefillChunkTokens?: number): Promise<StepRunner> {
  const e = await StepRunner.create(m.config, m.checkpoint, { cacheDir: testCacheDir, attention, prefillChunkTokens });
  engines.push(e);
  return e;
}

const prompt = (n: number, seed: number) => Array.from({ length: n }, (_, i) => 1 + ((i * 37 + seed * 101) % 500));

describe('decode attention over a long past equals recomputation', () => {
  // the longer row starts one block below the boundary and crosses it after a few steps
  const lengths = [DECODE_ATTENTION_MIN_CAPACITY - 66, 40];
  for (const [name, { layouts }] of Object.entries(MODELS)) {
    for (const attention of layouts) {
      it(`${name}, ${attention}: two rows of different lengths decoded together across the boundary`, async () => {
        const m = await model(name);
        const e = await engine(m, attention);
        const rows = lengths.map((n, r) => prompt(n, r));
        const outs = await e.prefill(rows.map((tokens) => ({ tokens })));
        const seqs = rows.map((tokens, r) => [...tokens, argmax(outs[r].logits)]);
        for (let step = 0; step < 12; step++) {
          const logits = await e.decode(new Map(outs.map((o, r) => [o.id, seqs[r].at(-1)!])));
          for (const [r, o] of outs.entries()) {
            const cached = logits.get(o.id)!;
            const [full] = await e.prefill([{ tokens: seqs[r] }]);
            e.release(full.id);
            expect(maxAbsDiff(cached, full.logits), `row ${r} step ${step}`).toBeLessThan(1e-4);
            seqs[r].push(argmax(cached));
          }
        }
        expect(seqs[0].length).toBeGreaterThan(DECODE_ATTENTION_MIN_CAPACITY - 64 + 1); // past the boundary block
        for (const o of outs) e.release(o.id);
      });
    }
  }

  it('a prompt whose last chunk is one token over a long past gives what one step gives', async () => {
    const m = await model('gemma2');
    const tokens = prompt(DECODE_ATTENTION_MIN_CAPACITY + 1, 5);
    for (const attention of MODELS.gemma2.layouts) {
      const chunked = await engine(m, attention, 64);
      const whole = await engine(m, attention);
      const [a] = await chunked.prefill([{ tokens }]);
      const [b] = await whole.prefill([{ tokens }]);
      chunked.release(a.id);
      whole.release(b.id);
      expect(maxAbsDiff(a.logits, b.logits), attention).toBeLessThan(1e-4);
    }
  });
});
