import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { PrefillInput } from '../src/engine/step-plan.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { ReftError } from '../src/errors.ts';
import { buildDecoderGraph } from '../src/graph/decoder.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { STORIES, inferenceCases } from './support/fixtures.ts';
import { greedyBatch, maxAbsDiff, testCacheDir } from './support/engine.ts';
import { cpuComputeNodes, nodePlacement } from './support/placement.ts';

/**
 * The decoder on ORT's WebGPU provider (Mesa's llvmpipe here, through Dawn's Vulkan backend)
 * against the CPU provider and the PyTorch reference. One WebGPU session for the file: its
 * shaders compile on first use, which on llvmpipe takes about a minute.
 */
const cases = inferenceCases();
const TOLERANCE = 1e-3;
let model: LoadedModel;
let gpu: StepRunner;
let cpu: StepRunner;

beforeAll(async () => {
  model = await loadModel(STORIES);
  cpu = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir });
  gpu = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, device: 'webgpu', kvCache: 'host' });
}, 300_000);
afterAll(async () => {
  await gpu?.close();
  await cpu?.close();
});

describe('the decoder graph under WebGPU', () => {
  for (const layout of ['separate', 'packed'] as const) {
    it(`${layout} layout: every compute node is placed on the WebGPU provider`, async () => {
      const graph = buildDecoderGraph(model.config, model.checkpoint, layout, 'webgpu');
      const placement = await nodePlacement(graph, model.checkpoint.dataDir, 'webgpu');
      expect(cpuComputeNodes(placement)).toEqual([]);
      expect(placement.has('WebGpuExecutionProvider')).toBe(true);
    });
  }

  it("Gemma 2's operators (gelu, soft-caps, scales, sliding windows) on stories' weights: every compute node on WebGPU too", async () => {
    const layout = model.config.layout;
    const gemmaLike = {
      ...model.config,
      layout: {
        ...layout,
        normOffset: 1,
        embeddingScale: 8,
        activation: 'gelu_tanh' as const,
        attentionScale: 0.3,
        attentionSoftcap: 50,
        finalLogitSoftcap: 30,
        slidingWindows: layout.slidingWindows.map((_, l) => (l % 2 ? 4 : null)),
      },
    };
    const graph = buildDecoderGraph(gemmaLike, model.checkpoint, 'separate', 'webgpu');
    expect(cpuComputeNodes(await nodePlacement(graph, model.checkpoint.dataDir, 'webgpu'))).toEqual([]);
  });

  it("the CPU's graph under WebGPU would leave its projections on the CPU (what the check catches)", async () => {
    // the device-cache variant: the host-cache one also attends over long pasts with FusedMatMul
    // (decodeAttention, CPU only), whose products would join the projections here
    const graph = buildDecoderGraph(model.config, model.checkpoint, 'separate', 'cpu', 'device');
    const onCpu = cpuComputeNodes(await nodePlacement(graph, model.checkpoint.dataDir, 'webgpu'));
    // q, k, v, o, gate+up, down per layer, and the lm_head
    expect(onCpu.map((n) => n.op)).toEqual(new Array(6 * model.config.numLayers + 1).fill('FusedMatMul'));
  });
});

describe('decoding on WebGPU equals the CPU and the PyTorch reference', () => {
  it('every case: logits at every prompt position within 1e-3 of the CPU and the reference', async () => {
    for (const c of cases) {
      const input: PrefillInput = { tokens: c.prompt, interventions: c.interventions, allLogits: true };
      const [onGpu] = await gpu.prefill([input]);
      const [onCpu] = await cpu.prefill([input]);
      gpu.release(onGpu.id);
      cpu.release(onCpu.id);
      expect(maxAbsDiff(onGpu.logits, onCpu.logits), c.name).toBeLessThan(TOLERANCE);
      expect(maxAbsDiff(onGpu.logits, c.logits), c.name).toBeLessThan(TOLERANCE);
    }
  }, 300_000);

  it('every case alone, and all of them in one batch, continue greedily as on the CPU and in the reference', async () => {
    const rows = cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions }));
    for (const [i, c] of cases.entries()) {
      const [alone] = await greedyBatch(gpu, [rows[i]], c.greedy.length);
      expect(alone, c.name).toEqual(c.greedy);
    }
    const steps = Math.max(...cases.map((c) => c.greedy.length));
    const onGpu = await greedyBatch(gpu, rows, steps);
    const onCpu = await greedyBatch(cpu, rows, steps);
    expect(onGpu).toEqual(onCpu);
    cases.forEach((c, i) => expect(onGpu[i].slice(0, c.greedy.length), c.name).toEqual(c.greedy));
    expect(gpu.liveSequences).toEqual([]);
  }, 300_000);

  it('KV-cached decoding equals full recomputation (interventions on the prompt only)', async () => {
    const c = cases[5];
    const [first] = await gpu.prefill([{ tokens: c.prompt, interventions: c.interventions }]);
    const tokens = [...c.prompt, argmax(first.logits)];
    for (let step = 0; step < 12; step++) {
      const cached = (await gpu.decode(new Map([[first.id, tokens.at(-1)!]]))).get(first.id)!;
      const [full] = await gpu.prefill([{ tokens, interventions: c.interventions, promptLength: c.prompt.length }]);
      gpu.release(full.id);
      expect(maxAbsDiff(cached, full.logits), `step ${step}`).toBeLessThan(TOLERANCE);
      tokens.push(argmax(cached));
    }
    gpu.release(first.id);
  }, 300_000);
});

describe('bad inputs get the same typed error on WebGPU as on the CPU', () => {
  const refusal = async (engine: StepRunner, run: (e: StepRunner) => Promise<unknown>) => {
    const err = await run(engine).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ReftError);
    const { code, field, message } = err as ReftError;
    return { code, field, message };
  };
  const same = async (run: (e: StepRunner) => Promise<unknown>) => {
    const onCpu = await refusal(cpu, run);
    expect(await refusal(gpu, run)).toEqual(onCpu);
    return onCpu;
  };

  it('an empty prompt', async () => {
    expect(await same((e) => e.prefill([{ tokens: [] }]))).toMatchObject({ code: 'prompt_empty', field: 'inputs.0.tokens' });
  });

  it('a prompt longer than the context', async () => {
    const tokens = new Array(model.config.maxPositions + 1).fill(1);
    expect(await same((e) => e.prefill([{ tokens }]))).toMatchObject({ code: 'prompt_too_long', field: 'prompt' });
  });

  it('a token id outside the vocabulary', async () => {
    expect(await same((e) => e.prefill([{ tokens: [1, model.config.vocabSize] }]))).toMatchObject({
      code: 'token_out_of_vocabulary',
      field: 'inputs.0.tokens',
    });
  });

  it('decoding past the context', async () => {
    const decodePast = async (e: StepRunner) => {
      const [out] = await e.prefill([{ tokens: new Array(model.config.maxPositions).fill(1) }]);
      try {
        await e.decode(new Map([[out.id, argmax(out.logits)]]));
      } finally {
        e.release(out.id);
      }
    };
    expect(await same(decodePast)).toMatchObject({ code: 'sequence_reached_context', field: 'max_new_tokens' });
    expect(gpu.liveSequences).toEqual([]);
  }, 120_000);
});
