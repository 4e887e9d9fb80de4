import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { SequenceId } from '../src/engine/step-plan.ts';
import { argmax, logSumExp } from '../src/sampling/sampler.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { greedyBatch, maxAbsDiff, storiesEngine, testCacheDir } from './support/engine.ts';
import { STORIES, inferenceCases } from './support/fixtures.ts';
import { joinGraph, selectGraph } from '../src/graph/kv-cache-graphs.ts';
import { buildDecoderGraph } from '../src/graph/decoder.ts';
import { cpuComputeNodes, nodePlacement } from './support/placement.ts';

/**
 * The KV cache on the device: ORT's WebGPU provider (on Mesa's llvmpipe here), stories260k.
 * One device engine for the file (its first session compiles shaders for about a minute), with
 * an 8-token prefill chunk so that the longer fixture prompts are prefilled in chunks. The CPU
 * engine (host cache) is the reference.
 */
let model: LoadedModel;
let device: StepRunner;
let cpu: StepRunner;
const cases = inferenceCases();

beforeAll(async () => {
  model = await loadModel(STORIES);
  device = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, device: 'webgpu', prefillChunkTokens: 8 });
  cpu = (await storiesEngine()).engine;
}, 600_000);
afterAll(async () => {
  await device?.close();
  await cpu?.close();
});

/** Greedy decoding with the tokens picked on the device (argmax in the graph). */
async function deviceGreedy(ids: SequenceId[], first: number[], steps: number): Promise<number[][]> {
  const gens = first.map((t) => [t]);
  for (let s = 1; s < steps; s++) {
    const out = await device.decodeStep(new Map(ids.map((id, i) => [id, gens[i].at(-1)!])), new Set());
    ids.forEach((id, i) => {
      const sample = out.get(id)!;
      if (!('token' in sample)) throw new Error('expected a token picked on the device');
      gens[i].push(sample.token);
    });
  }
  return gens;
}

describe('KV cache on the WebGPU device', () => {
  it('every reference case, batched together: logits within 1e-3 of the fixtures, greedy tokens as on the CPU', async () => {
    const outs = await device.prefill(cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions, allLogits: true })));
    cases.forEach((c, i) => expect(maxAbsDiff(outs[i].logits, c.logits), c.name).toBeLessThan(1e-3));
    outs.forEach((o) => device.release(o.id));

    const rows = cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions }));
    const prefilled = await device.prefill(rows);
    const gens = await deviceGreedy(
      prefilled.map((o) => o.id),
      prefilled.map((o) => argmax(o.logits)),
      20,
    );
    prefilled.forEach((o) => device.release(o.id));
    expect(device.liveSequences).toEqual([]);
    cases.forEach((c, i) => expect(gens[i], c.name).toEqual(c.greedy.slice(0, 20)));
    expect(gens).toEqual(await greedyBatch(cpu, rows, 20));
  });

  it("a decode step's past stays on the device, and its traffic does not grow with the context", async () => {
    const sentence = model.tokenizer.encode('Tom and his dog went to the park. They played with a red ball all day.').slice(1);
    const long = [1, ...Array.from({ length: 12 }, () => sentence).flat()].slice(0, 200);
    const traffic = async (prompt: number[]) => {
      const [out] = await device.prefill([{ tokens: prompt }]);
      const first = argmax(out.logits);
      const sample = (await device.decodeStep(new Map([[out.id, first]]), new Set())).get(out.id)!;
      const step = device.lastTransfer;
      // the token picked on the device, with its log-probability, as the logits say
      const logits = (await device.decode(new Map([[out.id, 'token' in sample ? sample.token : -1]]))).get(out.id)!;
      device.release(out.id);
      return { step, sample, kvBytes: 0, logitsAfter: logits, first };
    };
    const short = await traffic(cases[0].prompt);
    const longer = await traffic(long);

    for (const t of [short, longer]) {
      expect(t.step.pastLocations).toEqual(['gpu-buffer']);
      expect(t.step.downloaded).toBe(8 + 4); // the token (int64) and its logprob (float32)
    }
    expect(longer.step.uploaded).toBe(short.step.uploaded);
    expect(longer.step.downloaded).toBe(short.step.downloaded);
    // the past alone would be 2 · layers · kv_heads · head_dim · 4 bytes per token: far more
    const { numLayers, numKvHeads, headDim } = model.config;
    expect(longer.step.uploaded).toBeLessThan(2 * numLayers * numKvHeads * headDim * 4 * 20);

    // the device's pick is the CPU's argmax, its logprob the CPU's log-softmax
    const [ref] = await cpu.prefill([{ tokens: cases[0].prompt }]);
    const refLogits = (await cpu.decode(new Map([[ref.id, short.first]]))).get(ref.id)!;
    cpu.release(ref.id);
    const token = argmax(refLogits);
    expect(short.sample).toEqual({ token, logprob: expect.closeTo(refLogits[token] - logSumExp(refLogits), 3) });
    expect(device.liveSequences).toEqual([]);
    expect(device.kvBytes).toBe(0);
  });

  it('in a mixed batch only the rows that sample on the host download their logits', async () => {
    const rows = [cases[0], cases[1], cases[2]].map((c) => ({ tokens: c.prompt, interventions: c.interventions }));
    const outs = await device.prefill(rows);
    const refs = await cpu.prefill(rows);
    const tokens = outs.map((o) => argmax(o.logits));
    const sampling = outs[1].id; // the middle row: its logits must be its own, not the first row's
    const step = await device.decodeStep(new Map(outs.map((o, i) => [o.id, tokens[i]])), new Set([sampling]));
    const transfer = device.lastTransfer;
    const cpuStep = await cpu.decode(new Map(refs.map((o, i) => [o.id, tokens[i]])));
    outs.forEach((o) => device.release(o.id));
    refs.forEach((o) => cpu.release(o.id));

    const vocab = model.config.vocabSize;
    expect(transfer.downloaded).toBe(vocab * 4 + rows.length * (8 + 4)); // one row of logits; every row's token and logprob
    const logits = step.get(sampling)!;
    expect('logits' in logits && maxAbsDiff(logits.logits, cpuStep.get(refs[1].id)!)).toBeLessThan(1e-3);
    for (const i of [0, 2]) expect(step.get(outs[i].id)).toMatchObject({ token: argmax(cpuStep.get(refs[i].id)!) });
  });

  it('cached decoding equals recomputing the whole sequence at each step (edit on the prompt only)', async () => {
    const c = cases[3];
    const [first] = await device.prefill([{ tokens: c.prompt, interventions: c.interventions }]);
    const [cached] = await deviceGreedy([first.id], [argmax(first.logits)], 10);
    device.release(first.id);
    const recomputed: number[] = [];
    for (let s = 0; s < 10; s++) {
      const tokens = [...c.prompt, ...recomputed];
      const [full] = await device.prefill([{ tokens, interventions: c.interventions, promptLength: c.prompt.length }]);
      device.release(full.id);
      recomputed.push(argmax(full.logits));
    }
    expect(cached).toEqual(recomputed);
  });

  it('rows join and leave mid-decode while a long prompt is prefilled in chunks between decode steps', async () => {
    const gens = new Map<SequenceId, number[]>();
    const decodeAll = async () => {
      const out = await device.decodeStep(new Map([...gens].map(([id, g]) => [id, g.at(-1)!])), new Set());
      for (const [id, s] of out) gens.get(id)!.push('token' in s ? s.token : argmax(s.logits));
      expect(device.lastTransfer.pastLocations).toEqual(['gpu-buffer']);
    };
    const short = cases[0].prompt.slice(0, 2);
    const [a] = await device.prefill([{ tokens: cases[1].prompt, interventions: cases[1].interventions }]);
    gens.set(a.id, [argmax(a.logits)]);
    const b = device.beginPrefill({ tokens: cases[3].prompt, interventions: cases[3].interventions }); // 15 tokens: 2 chunks
    let c: SequenceId | undefined;
    let cTokens: number[] = [];
    let outB = null;
    for (let chunk = 0; ; chunk++) {
      outB = await device.continuePrefill();
      if (outB) break;
      await decodeAll();
      const [out] = await device.prefill([{ tokens: short }]); // c joins while b is pending
      c = out.id;
      gens.set(c, [argmax(out.logits)]);
      await decodeAll();
      await decodeAll();
    }
    cTokens = gens.get(c!)!;
    gens.delete(c!);
    device.release(c!); // c leaves; a keeps decoding, b joins
    gens.set(b, [argmax(outB.logits)]);
    while (gens.get(b)!.length < 8) await decodeAll();
    const genA = gens.get(a.id)!;
    gens.delete(a.id);
    device.release(a.id); // a leaves first: b moves into its row
    const [d] = await device.prefill([{ tokens: cases[4].prompt, interventions: cases[4].interventions }]);
    gens.set(d.id, [argmax(d.logits)]);
    while (gens.get(d.id)!.length < 6) await decodeAll();
    for (const id of gens.keys()) device.release(id);
    expect(device.liveSequences).toEqual([]);

    const solo = async (tokens: number[], interventions?: (typeof cases)[number]['interventions']) =>
      (await greedyBatch(cpu, [{ tokens, interventions }], 20))[0];
    expect(cTokens.length).toBeGreaterThan(2);
    expect(cTokens).toEqual((await solo(short)).slice(0, cTokens.length));
    expect(genA).toEqual((await solo(cases[1].prompt, cases[1].interventions)).slice(0, genA.length));
    const genB = gens.get(b)!;
    expect(genB).toEqual((await solo(cases[3].prompt, cases[3].interventions)).slice(0, genB.length));
    expect(gens.get(d.id)).toEqual((await solo(cases[4].prompt, cases[4].interventions)).slice(0, 6));
  });

  it("the cache's join and select graphs run wholly on the device, and so do the decoder's attention and sampling", async () => {
    const layers = 2 * model.config.numLayers;
    for (const graph of [joinGraph(model.config, layers), selectGraph(model.config, layers)]) {
      expect([...(await nodePlacement(graph, '.', 'webgpu')).keys()]).toEqual(['WebGpuExecutionProvider']);
    }
    const decoder = await nodePlacement(
      buildDecoderGraph(model.config, model.checkpoint, undefined, 'webgpu', 'device'),
      model.checkpoint.dataDir,
      'webgpu',
    );
    // attention, the device's greedy pick and its logprob included: nothing computes on the CPU
    expect(decoder.has('WebGpuExecutionProvider')).toBe(true);
    expect(cpuComputeNodes(decoder)).toEqual([]);
  });
});
