import { mkdtempSync, readdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { ReftError } from '../src/errors.ts';
import { GraphBuilder, MS_DOMAIN } from '../src/graph/onnx.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { dequantizeMatrix, quantizeMatrix, type QuantScheme } from '../src/quant/blocks.ts';
import { ABLATED_SCHEMES, QUANT_SCHEMES, parseWeightsFlag, resolveWeightFormat } from '../src/quant/formats.ts';
import { quantizedCheckpoint } from '../src/quant/cache.ts';
import { dequantizedWeights } from '../src/graph/projection-weights.ts';
import { createSession } from '../src/runtime/session.ts';
import { toFloat32 } from '../src/model/safetensors.ts';
import type { WeightsChoice } from '../src/quant/load.ts';
import { greedyBatch, maxAbsDiff, storiesEngine, testCacheDir } from './support/engine.ts';
import { inferenceCases, STORIES } from './support/fixtures.ts';
import { compare, selfGeneratedText, teacherForced, type Agreement } from './support/quant-accuracy.ts';
import { thrownBy } from './support/errors.ts';
import { runCli, startServerProcess, type ServerProcess } from './support/server.ts';
import { HELD_OUT_OPENINGS, NEW_SENTENCE, TRAIN_OPENINGS } from './support/training-data.ts';
import { Trainer } from '../src/training/trainer.ts';

/**
 * q8 and q4 weights (src/quant/) against the float model on stories260k: teacher-forced
 * accuracy on text the float model samples itself, the fixture cases' greedy continuations, the
 * quantization cache, and bad input.
 */
let f32: StepRunner;
let model: LoadedModel;
const VOCAB = 512;

beforeAll(async () => {
  ({ engine: f32, model } = await storiesEngine());
});
afterAll(() => f32?.close());

/**
 * ggml's reference Q4_0 (quantize_row_q4_0_ref): symmetric, block 32, d = (the signed value of
 * largest magnitude) / −8, q = min(15, trunc(x/d + 8.5)), decoded (q − 8)·d: MatMulNBits' 4-bit
 * blocks without zero points are this format.
 */
const GGML_Q4_0: QuantScheme = {
  id: 'test-ggml-q4_0-ref',
  bits: 4,
  zeroPoints: false,
  quantizeBlock: (x, n, codes) => {
    let amax = 0;
    let max = 0;
    for (let i = 0; i < n; i++) {
      if (Math.abs(x[i]) > amax) {
        amax = Math.abs(x[i]);
        max = x[i];
      }
    }
    const d = max / -8;
    const id = d ? 1 / d : 0;
    for (let i = 0; i < n; i++) codes[i] = Math.min(15, Math.trunc(x[i] * id + 8.5));
    return { scale: d, zero: 8 };
  },
};

async function quantizedEngine(weights: WeightsChoice, cacheDir = testCacheDir): Promise<StepRunner> {
  return StepRunner.create(model.config, model.checkpoint, { cacheDir, weights });
}

describe('accuracy against the float model, teacher-forced on text it generates itself', () => {
  let text: number[][];
  let reference: Float32Array[];
  const measured = new Map<string, Agreement & { bytes: number }>();

  async function measure(label: string, weights: WeightsChoice): Promise<Agreement & { bytes: number }> {
    const engine = await quantizedEngine(weights);
    try {
      const result = { ...compare(reference, await teacherForced(engine, text), VOCAB), bytes: engine.weights.bytes };
      measured.set(label, result);
      return result;
    } finally {
      await engine.close();
    }
  }

  beforeAll(async () => {
    const prompts = ['Once upon a time', 'One day, a little', 'Tom and his dog', 'The sun was'].map((p) => model.tokenizer.encode(p));
    text = await selfGeneratedText(f32, prompts, 300, 7);
    reference = await teacherForced(f32, text);
  });

  afterAll(() => {
    const rows = [...measured].map(
      ([label, r]) => `${label.padEnd(32)} KL ${r.meanKl.toFixed(5)}  top-1 ${(100 * r.top1).toFixed(2)}%  ${r.bytes} weight bytes`,
    );
    console.log(`teacher-forced over ${measured.values().next().value?.positions} positions:\n${rows.join('\n')}`);
  });

  it('covers over 1,000 positions', () => {
    expect(reference.reduce((n, l) => n + l.length / VOCAB, 0)).toBeGreaterThanOrEqual(1000);
  });

  it('q8: mean KL ≤ 0.002 and top-1 agreement ≥ 97%', async () => {
    const q8 = await measure('q8', 'q8');
    expect(q8.positions).toBeGreaterThanOrEqual(1000);
    expect(q8.meanKl).toBeLessThanOrEqual(0.002);
    expect(q8.top1).toBeGreaterThanOrEqual(0.97);
  });

  it("q4: clearly better than ggml's reference Q4_0 on the same text and kernels", async () => {
    const ref = await measure('ggml Q4_0 reference', GGML_Q4_0);
    const q4 = await measure('q4', 'q4');
    expect(q4.meanKl).toBeLessThan(0.7 * ref.meanKl);
    expect(q4.top1).toBeGreaterThan(ref.top1 + 0.03);
  });

  it('each refinement gains: the block search over round-to-nearest, the 8-bit vocabulary matrix over 4 bits', async () => {
    const rtn = await measure('q4 round-to-nearest, all 4-bit', ABLATED_SCHEMES['q4 round-to-nearest, all 4-bit']);
    const searched = await measure('q4 searched, all 4-bit', ABLATED_SCHEMES['q4 searched, all 4-bit']);
    const q4 = measured.get('q4') ?? (await measure('q4', 'q4'));
    expect(searched.meanKl).toBeLessThan(rtn.meanKl);
    expect(q4.meanKl).toBeLessThan(searched.meanKl);
    // q8's search: reported, not asserted (its round-to-nearest already meets the bar)
    await measure('q8 round-to-nearest', ABLATED_SCHEMES['q8 round-to-nearest']);
    // the weight bytes follow the formats: q4 well under q8, q8 well under f32
    expect(q4.bytes).toBeLessThan(0.7 * measured.get('q8 round-to-nearest')!.bytes);
    expect(measured.get('q8 round-to-nearest')!.bytes).toBeLessThan(0.4 * f32.weights.bytes);
  });
});

describe('q8 keeps what the fixtures expect', () => {
  let q8: StepRunner;
  const cases = inferenceCases();
  beforeAll(async () => {
    q8 = await quantizedEngine('q8');
  });
  afterAll(() => q8?.close());

  /**
   * The float model's greedy steps and the margin between its two best logits at each: a step
   * with a margin under 0.05 is a near-tie any rounding may flip, and everything after it follows
   * from the flip, so the comparison stops there.
   */
  async function floatMargins(tokens: number[], interventions: (typeof cases)[number]['interventions'], steps: number) {
    const [out] = await f32.prefill([{ tokens, interventions }]);
    const margins: number[] = [];
    let logits = out.logits;
    for (let s = 0; s < steps; s++) {
      const sorted = Float32Array.from(logits).sort();
      margins.push(sorted[VOCAB - 1] - sorted[VOCAB - 2]);
      if (s + 1 < steps) logits = (await f32.decode(new Map([[out.id, argmax(logits)]]))).get(out.id)!;
    }
    f32.release(out.id);
    return margins;
  }

  for (const c of cases) {
    it(`${c.name}: the greedy continuation's first 8 tokens, or up to a float near-tie`, async () => {
      const margins = await floatMargins(c.prompt, c.interventions, 8);
      const tie = margins.findIndex((m) => m < 0.05);
      const checked = tie === -1 ? 8 : tie;
      if (tie !== -1) console.log(`${c.name}: steps ${tie}… exempt (float top-2 margin ${margins[tie].toFixed(3)} at step ${tie})`);
      const [gen] = await greedyBatch(q8, [{ tokens: c.prompt, interventions: c.interventions }], 8);
      expect(gen.slice(0, checked)).toEqual(c.greedy.slice(0, checked));
      expect(checked).toBeGreaterThanOrEqual(2); // the fixture's near-ties come late enough to leave something to check
    });
  }

  it('a batch mixing every case and a row without intervention gives each row what it gets alone', async () => {
    const rows = [
      ...cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions })),
      { tokens: cases[3].prompt, interventions: [] },
    ];
    const together = await greedyBatch(q8, rows, 16);
    for (const [i, row] of rows.entries()) {
      const [alone] = await greedyBatch(q8, [row], 16);
      expect(together[i], `row ${i}`).toEqual(alone);
    }
    expect(together.at(-1)).not.toEqual(together[3]); // the intervention still matters under q8
  });
});

describe('the quantization cache', () => {
  const dir = mkdtempSync(join(tmpdir(), 'reft-quant-cache-'));
  const cacheFile = () => {
    const files = readdirSync(join(dir, 'quantized')).filter((f) => f.endsWith('.safetensors'));
    expect(files).toHaveLength(1);
    return join(dir, 'quantized', files[0]);
  };
  const logitsOf = async (engine: StepRunner) => {
    const [o] = await engine.prefill([{ tokens: inferenceCases()[0].prompt, allLogits: true }]);
    engine.release(o.id);
    return o.logits;
  };

  it('is built on the first start, read on the second, and rebuilt when truncated or corrupted', async () => {
    const log: string[] = [];
    const first = await StepRunner.create(model.config, model.checkpoint, { cacheDir: dir, weights: 'q4', log: (m) => log.push(m) });
    expect(first.weights).toMatchObject({ format: 'q4', cache: 'built' });
    expect(log[0]).toMatch(/quantized weights \(q4-asym-search\) built into/);
    const expected = await logitsOf(first);
    await first.close();

    const second = await StepRunner.create(model.config, model.checkpoint, { cacheDir: dir, weights: 'q4', log: (m) => log.push(m) });
    expect(second.weights.cache).toBe('hit');
    expect(log[1]).toMatch(/loaded from cache/);
    expect(maxAbsDiff(await logitsOf(second), expected)).toBe(0);
    await second.close();

    const path = cacheFile();
    const size = statSync(path).size;
    truncateSync(path, size - 1000);
    const third = await StepRunner.create(model.config, model.checkpoint, { cacheDir: dir, weights: 'q4', log: (m) => log.push(m) });
    expect(third.weights.cache).toBe('rebuilt');
    expect(log[2]).toMatch(/unusable \(bad header: .*runs past the end/);
    expect(statSync(path).size).toBe(size);
    expect(maxAbsDiff(await logitsOf(third), expected)).toBe(0);
    await third.close();

    const bytes = readFileSync(path);
    bytes[size - 5000] ^= 0x5a; // one byte inside the blocks: the header still parses
    writeFileSync(path, bytes);
    const fourth = await StepRunner.create(model.config, model.checkpoint, { cacheDir: dir, weights: 'q4', log: (m) => log.push(m) });
    expect(fourth.weights.cache).toBe('rebuilt');
    expect(log[3]).toMatch(/unusable \(data hash mismatch\)/);
    expect(maxAbsDiff(await logitsOf(fourth), expected)).toBe(0);
    await fourth.close();
  });

  it('quantizing over worker threads writes the same file as quantizing on one thread', async () => {
    const files: Buffer[] = [];
    for (const threads of [0, 2]) {
      const q = await quantizedCheckpoint(
        model.config,
        model.checkpoint,
        QUANT_SCHEMES.q4,
        mkdtempSync(join(tmpdir(), 'reft-quant-threads-')),
        {
          threads,
        },
      );
      expect(q.outcome).toBe('built');
      files.push(readFileSync(join(q.dir, q.file)));
    }
    expect(files[1].equals(files[0])).toBe(true);
  }, 120_000); // two worker threads start on a shared machine

  it('keys q8 and q4 apart, and f32 never touches it', async () => {
    const q8 = await StepRunner.create(model.config, model.checkpoint, { cacheDir: dir, weights: 'q8' });
    expect(q8.weights.cache).toBe('built');
    await q8.close();
    expect(readdirSync(join(dir, 'quantized')).filter((f) => f.endsWith('.safetensors'))).toHaveLength(2);
    expect(f32.weights).toEqual({ format: 'f32', bytes: expect.any(Number), cache: null });
  });
});

describe('bad input', () => {
  it('an unknown format is refused naming the field and the formats', () => {
    const err = (() => {
      try {
        parseWeightsFlag('q3');
      } catch (e) {
        return e as ReftError;
      }
      throw new Error('accepted q3');
    })();
    expect(err).toBeInstanceOf(ReftError);
    expect(err.field).toBe('weights');
    expect(err.code).toBe('weights_format_unknown');
    expect(thrownBy(() => resolveWeightFormat('f16'))).toMatchObject({ code: 'weights_format_unsupported', field: 'weights' });
    expect(resolveWeightFormat('auto')).toBe('f32');
  });

  it('the CLI refuses an unknown format before loading anything, and generates with q8', async () => {
    const env = { ...process.env, REFT_CACHE_DIR: mkdtempSync(join(tmpdir(), 'reft-cli-cache-')) };
    const bad = await runCli(['generate', '--model', STORIES, '--weights', 'q3', '--prompt', 'Once upon a time'], env);
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/--weights <format>.*'q3' is invalid. Allowed choices are auto, f32, f16, q8, q4/);
    const good = await runCli(
      ['generate', '--model', STORIES, '--weights', 'q8', '--prompt', 'Once upon a time', '--max-new-tokens', '4'],
      env,
    );
    expect(good.stderr).toBe('');
    expect(good.status).toBe(0);
    expect(good.stdout).toBe(', there was a\n'); // the float model's first tokens too (fixture base case)
  }, 180_000); // two CLI processes, each loading the model

  it('an input size that is not a multiple of 32 is padded: MatMulNBits equals x·dequantized(W)ᵀ', async () => {
    const rows = 6;
    const cols = 40; // one whole block and one of 8
    const w = Float32Array.from({ length: rows * cols }, (_, i) => Math.sin(i * 1.7) * (1 + (i % 7)));
    for (const scheme of [
      { id: 't8', bits: 8 as const, zeroPoints: false, quantizeBlock: ABLATED_SCHEMES['q8 round-to-nearest'].quantizeBlock },
      ABLATED_SCHEMES['q4 searched, all 4-bit'],
    ]) {
      const q = quantizeMatrix(w, rows, cols, scheme);
      expect(q.blocks).toBe(2);
      const deq = dequantizeMatrix(q);
      expect(maxAbsDiff(deq, w)).toBeLessThan(scheme.bits === 8 ? 0.05 : 0.8);
      const g = new GraphBuilder('padded');
      const x = g.input('x', 'float32', [1, cols]);
      const inputs = [x, g.input('b', 'uint8', [rows, 2, 32 * (scheme.bits / 8)]), g.input('s', 'float32', [rows * 2])];
      if (q.zeros) inputs.push(g.input('z', 'uint8', [q.zeros.length]));
      const y = g.op(
        'MatMulNBits',
        inputs,
        { K: cols, N: rows, bits: scheme.bits, block_size: 32, accuracy_level: 0 },
        { domain: MS_DOMAIN },
      );
      g.output(y, 'y', 'float32', [1, rows]);
      const session = await ort.InferenceSession.create(g.encode({ '': 21, [MS_DOMAIN]: 1 }));
      const xs = Float32Array.from({ length: cols }, (_, i) => Math.cos(i));
      const feeds: Record<string, ort.Tensor> = {
        x: new ort.Tensor('float32', xs, [1, cols]),
        b: new ort.Tensor('uint8', q.data, [rows, 2, 32 * (scheme.bits / 8)]),
        s: new ort.Tensor('float32', q.scales, [rows * 2]),
      };
      if (q.zeros) feeds.z = new ort.Tensor('uint8', q.zeros, [q.zeros.length]);
      const out = (await session.run(feeds)).y.data as Float32Array;
      const expected = Float32Array.from({ length: rows }, (_, r) => xs.reduce((a, v, k) => a + v * deq[r * cols + k], 0));
      expect(maxAbsDiff(out, expected)).toBeLessThan(1e-4);
      await session.release();
    }
  });
});

describe('training over a quantized frozen base', () => {
  it("the training graph's dequantized weights are exactly the blocks MatMulNBits reads, not the float checkpoint", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'reft-dequant-'));
    for (const scheme of [QUANT_SCHEMES.q8, QUANT_SCHEMES.q4]) {
      const q = await quantizedCheckpoint(model.config, model.checkpoint, scheme, dir);
      const file = readFileSync(join(q.dir, q.file));
      const g = new GraphBuilder('dequantized');
      const weight = dequantizedWeights(g, q);
      const names = ['model.layers.2.mlp.down_proj.weight', 'model.layers.0.self_attn.q_proj.weight', 'model.embed_tokens.weight'];
      names.forEach((n, i) => g.output(g.op('Identity', [weight(n)]), `w${i}`, 'float32', model.checkpoint.weights.get(n)!.shape));
      const session = await createSession(g.encode({ '': 21 }), q.dir, { threads: 1 });
      const out = await session.run({});
      for (const [i, name] of names.entries()) {
        const m = q.matrices.get(name)!;
        const bytes = (s: { offset: number; length: number }) => new Uint8Array(file.buffer, file.byteOffset + s.offset, s.length);
        const scales = new Float32Array(bytes(m.scales).slice().buffer);
        const expected = dequantizeMatrix({ ...m, data: bytes(m.data), scales, zeros: m.zeros && bytes(m.zeros) });
        const got = out[`w${i}`].data as Float32Array;
        expect(maxAbsDiff(got, expected), `${scheme.id} ${name}`).toBe(0);
        const checkpointFile = new Uint8Array(readFileSync(join(model.checkpoint.dataDir, 'model.safetensors')));
        const original = toFloat32({ bytes: checkpointFile } as never, model.checkpoint.weights.get(name)!);
        expect(maxAbsDiff(got, original), `${scheme.id} ${name} differs from the float weight`).toBeGreaterThan(1e-4);
      }
      await session.release();
    }
  });

  /** Recipe (a) of test/training-quality.test.ts (seed 1), trained and generated on the same quantized base. */
  for (const weights of ['q8', 'q4'] as const) {
    it(`recipe (a) on ${weights}: held-out openings continue with the trained sentence (≥ 90%)`, async () => {
      const engine = await quantizedEngine(weights);
      const encode = (t: string) => model.tokenizer.encode(t);
      const completion = (opening: string) => encode(opening + NEW_SENTENCE).slice(encode(opening).length);
      const rows = TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE }));
      const recipe = { rank: 4, layers: 'all' as const, positions: 'f3+l3', epochs: 30, learning_rate: 1e-2, batch_size: 1, seed: 1 };
      const trainer = await Trainer.create(model, { ...recipe, kind: 'loreft', lr_scheduler: 'linear' }, rows, {
        cacheDir: testCacheDir,
        weights,
      });
      const outcome = await trainer.train();
      await trainer.release();
      if (outcome.status !== 'completed') throw new Error('training did not complete');
      const interventions = outcome.artifact.parsed.interventions;
      const target = completion(HELD_OUT_OPENINGS[0]);
      const base = await greedyBatch(
        engine,
        HELD_OUT_OPENINGS.map((p) => ({ tokens: encode(p), interventions: [] })),
        target.length,
      );
      const gens = await greedyBatch(
        engine,
        HELD_OUT_OPENINGS.map((p) => ({ tokens: encode(p), interventions })),
        target.length,
      );
      await engine.close();
      const startsWith = (gen: number[], prefix: number[]) => prefix.every((t, i) => gen[i] === t);
      expect(HELD_OUT_OPENINGS.filter((o, i) => startsWith(base[i], completion(o)))).toEqual([]);
      const hits = HELD_OUT_OPENINGS.filter((o, i) => startsWith(gens[i], completion(o))).length;
      console.log(`${weights}: recipe (a) seed 1, held-out ${hits}/${HELD_OUT_OPENINGS.length} start with the new sentence`);
      expect(hits / HELD_OUT_OPENINGS.length).toBeGreaterThanOrEqual(0.9);
    }, 180_000);
  }
});

describe('the server reports its weights', () => {
  it('model ready, /v1/models and /metrics say q8 and its bytes; a second start reads the quantization cache', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'reft-q8-server-'));
    const weightBytes = async (server: ServerProcess) => {
      const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> };
      expect(models.data[0].weights).toEqual({ format: 'q8', bytes: expect.any(Number) });
      const metrics = await (await fetch(`${server.url}/metrics`)).text();
      const line = metrics.split('\n').find((l) => l.startsWith('reft_model_weight_bytes{'));
      expect(line).toBe(`reft_model_weight_bytes{format="q8"} ${(models.data[0].weights as { bytes: number }).bytes}`);
      return (models.data[0].weights as { bytes: number }).bytes;
    };
    const ready = (server: ServerProcess) => server.logs.find((l) => l.msg === 'model ready')!;
    const first = await startServerProcess({ dataDir, args: ['--weights', 'q8', '--no-worker'] });
    try {
      expect(ready(first)).toMatchObject({ weights: 'q8', quantizationCache: 'built' });
      const bytes = await weightBytes(first);
      expect(ready(first).weightBytes).toBe(bytes);
      expect(bytes).toBeLessThan(0.4 * f32.weights.bytes);
    } finally {
      await first.stop();
    }
    const second = await startServerProcess({ dataDir, args: ['--weights', 'q8', '--no-worker'] });
    try {
      expect(ready(second)).toMatchObject({ weights: 'q8', quantizationCache: 'hit' });
      expect(second.logs.some((l) => /quantized weights \(q8-sym-search\) loaded from cache/.test(String(l.msg)))).toBe(true);
      await weightBytes(second);
    } finally {
      await second.stop();
    }
  }, 180_000); // two server starts on a shared machine
});
