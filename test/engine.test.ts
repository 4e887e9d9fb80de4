import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import { argmax } from '../src/sampling/sampler.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { inferenceCases } from './support/fixtures.ts';
import { greedyBatch as greedyRows, maxAbsDiff, storiesEngine, testCacheDir } from './support/engine.ts';

let engine: StepRunner;
let model: LoadedModel;
const cases = inferenceCases();
const VOCAB = 512;

beforeAll(async () => {
  ({ engine, model } = await storiesEngine());
});
afterAll(() => engine?.close());

const greedyBatch = (rows: Parameters<typeof greedyRows>[1], steps: number) => greedyRows(engine, rows, steps);

describe('decoder engine on stories260k against the PyTorch reference', () => {
  it('has the fixture cases', () => {
    expect(cases.map((c) => c.name)).toEqual(['base', 'loreft_l1', 'loreft_f2l2_shared', 'loreft_f3l3_split', 'direft_f1l1', 'mixed_rank']);
  });

  for (const c of cases) {
    it(`${c.name}: logits within 1e-4 at every prompt position`, async () => {
      const [out] = await engine.prefill([{ tokens: c.prompt, interventions: c.interventions, allLogits: true }]);
      engine.release(out.id);
      expect(out.logits.length).toBe(c.prompt.length * VOCAB);
      expect(maxAbsDiff(out.logits, c.logits)).toBeLessThan(1e-4);
    });

    it(`${c.name}: greedy continuation with the KV cache equals the reference`, async () => {
      const [gen] = await greedyBatch([{ tokens: c.prompt, interventions: c.interventions }], c.greedy.length);
      expect(gen).toEqual(c.greedy);
    });
  }

  it('a batch mixing every case and a row without intervention gives each row its own result', async () => {
    const rows = [
      ...cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions })),
      { tokens: cases[3].prompt, interventions: [] },
    ];
    const gens = await greedyBatch(rows, 24);
    cases.forEach((c, i) => expect(gens[i], c.name).toEqual(c.greedy));
    const [alone] = await greedyBatch([rows.at(-1)!], 24);
    expect(gens.at(-1)).toEqual(alone);
    expect(alone).not.toEqual(cases[3].greedy); // the intervention matters for this prompt
  });

  it('batched prefill logits equal each row alone', async () => {
    const batch = await engine.prefill(cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions, allLogits: true })));
    batch.forEach((o, i) => {
      engine.release(o.id);
      expect(maxAbsDiff(o.logits, cases[i].logits), cases[i].name).toBeLessThan(1e-4);
    });
  });

  it('KV-cached decoding equals full recomputation for 32 steps (interventions on the prompt only)', async () => {
    for (const c of [cases[3], cases[5]]) {
      const [first] = await engine.prefill([{ tokens: c.prompt, interventions: c.interventions }]);
      const tokens = [...c.prompt, argmax(first.logits)];
      for (let step = 0; step < 32; step++) {
        const cached = (await engine.decode(new Map([[first.id, tokens.at(-1)!]]))).get(first.id)!;
        const [full] = await engine.prefill([{ tokens, interventions: c.interventions, promptLength: c.prompt.length }]);
        engine.release(full.id);
        expect(maxAbsDiff(cached, full.logits), `${c.name} step ${step}`).toBeLessThan(1e-4);
        tokens.push(argmax(cached));
      }
      engine.release(first.id);
    }
  });

  it('decoding on past the cache growing its blocks still equals full recomputation', async () => {
    // 140 tokens crosses two re-layouts of the cache (blocks of 64); the past tensors are rebuilt
    // there and reused between them
    const c = cases[3];
    const [first] = await engine.prefill([{ tokens: c.prompt, interventions: c.interventions }]);
    const tokens = [...c.prompt, argmax(first.logits)];
    let cached = first.logits;
    while (tokens.length < 140) {
      cached = (await engine.decode(new Map([[first.id, tokens.at(-1)!]]))).get(first.id)!;
      tokens.push(argmax(cached));
    }
    engine.release(first.id);
    const [full] = await engine.prefill([{ tokens: tokens.slice(0, -1), interventions: c.interventions, promptLength: c.prompt.length }]);
    engine.release(full.id);
    expect(maxAbsDiff(cached, full.logits)).toBeLessThan(1e-4);
  });

  it('"Once upon a time" continues with the reference story', async () => {
    const prompt = model.tokenizer.encode('Once upon a time');
    expect(prompt).toEqual([1, 403, 407, 261, 378]);
    const [gen] = await greedyBatch([{ tokens: prompt, interventions: [] }], 32);
    expect(model.tokenizer.decode(gen)).toMatch(/^, there was a little girl named Lily\. She loved to play outside in the park\./);
  });

  it('sequences join and leave the running batch between steps', async () => {
    const [a] = await engine.prefill([{ tokens: cases[1].prompt, interventions: cases[1].interventions }]);
    const genA = [argmax(a.logits)];
    const step = async (ids: number[], gens: number[][]) => {
      const l = await engine.decode(new Map(ids.map((id, i) => [id, gens[i].at(-1)!])));
      ids.forEach((id, i) => gens[i].push(argmax(l.get(id)!)));
    };
    for (let i = 0; i < 5; i++) await step([a.id], [genA]);
    const [b] = await engine.prefill([{ tokens: cases[4].prompt, interventions: cases[4].interventions }]);
    const genB = [argmax(b.logits)];
    for (let i = 0; i < 10; i++) await step([a.id, b.id], [genA, genB]);
    engine.release(a.id);
    for (let i = 0; i < 13; i++) await step([b.id], [genB]);
    expect(genA).toEqual(cases[1].greedy.slice(0, 16));
    expect(genB).toEqual(cases[4].greedy);
    engine.release(b.id);
    expect(engine.liveSequences).toEqual([]);
  });
});

describe('prompts longer than the prefill chunk run chunk by chunk', () => {
  let chunked: StepRunner;
  beforeAll(async () => {
    // chunks of 3 tokens: every fixture prompt spans several, and intervened positions fall on
    // both sides of chunk boundaries
    chunked = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, prefillChunkTokens: 3 });
  });
  afterAll(() => chunked?.close());

  for (const c of cases) {
    it(`${c.name}: logits at every position and the greedy continuation equal the reference`, async () => {
      expect(c.prompt.length).toBeGreaterThan(3);
      const [out] = await chunked.prefill([{ tokens: c.prompt, interventions: c.interventions, allLogits: true }]);
      chunked.release(out.id);
      expect(out.logits.length).toBe(c.logits.length);
      expect(maxAbsDiff(out.logits, c.logits)).toBeLessThan(1e-4);
      const [gen] = await greedyRows(chunked, [{ tokens: c.prompt, interventions: c.interventions }], c.greedy.length);
      expect(gen).toEqual(c.greedy);
    });
  }

  it('a prompt prefilled a chunk at a time between decode steps leaves every row its own result', async () => {
    const short = { ...cases[0], prompt: cases[0].prompt.slice(0, 2) };
    const gens = new Map<number, number[]>();
    const decodeAll = async () => {
      const logits = await chunked.decode(new Map([...gens].map(([id, g]) => [id, g.at(-1)!])));
      for (const [id, l] of logits) gens.get(id)!.push(argmax(l));
    };
    const [a] = await chunked.prefill([{ tokens: cases[1].prompt, interventions: cases[1].interventions }]);
    gens.set(a.id, [argmax(a.logits)]);
    const b = chunked.beginPrefill({ tokens: cases[3].prompt, interventions: cases[3].interventions });
    expect(chunked.prefilling).toBe(b);
    let c: number | undefined;
    let cTokens: number[] = [];
    let outB = null;
    for (let chunk = 0; ; chunk++) {
      outB = await chunked.continuePrefill();
      if (outB) break;
      await decodeAll(); // b is not part of it until its last chunk has run
      if (chunk === 0) {
        const [out] = await chunked.prefill([{ tokens: short.prompt }]); // joins behind b's row
        c = out.id;
        gens.set(c, [argmax(out.logits)]);
      }
      if (chunk === 1) {
        cTokens = gens.get(c!)!;
        gens.delete(c!);
        chunked.release(c!); // leaves while b is still pending
      }
    }
    expect(chunked.prefilling).toBeNull();
    expect(cTokens.length).toBeGreaterThan(1); // c joined and left while b was pending
    gens.set(b, [argmax(outB.logits)]);
    while (gens.get(b)!.length < 8) await decodeAll();
    for (const id of gens.keys()) chunked.release(id);
    expect(chunked.liveSequences).toEqual([]);

    const solo = async (tokens: number[], interventions?: (typeof cases)[number]['interventions']) =>
      (await greedyBatch([{ tokens, interventions }], 16))[0];
    const genA = gens.get(a.id)!;
    expect(genA).toEqual((await solo(cases[1].prompt, cases[1].interventions)).slice(0, genA.length));
    expect(gens.get(b)).toEqual((await solo(cases[3].prompt, cases[3].interventions)).slice(0, 8));
    expect(cTokens).toEqual((await solo(short.prompt)).slice(0, cTokens.length));
  });

  it('one call mixing short and long prompts returns each row its own result, in order', async () => {
    const rows = [cases[1], { ...cases[0], prompt: cases[0].prompt.slice(0, 2) }, cases[4], cases[3]];
    const gens = await greedyRows(
      chunked,
      rows.map((c) => ({ tokens: c.prompt, interventions: c.interventions })),
      8,
    );
    const alone: number[][] = [];
    for (const c of rows) alone.push((await greedyBatch([{ tokens: c.prompt, interventions: c.interventions }], 8))[0]);
    expect(gens).toEqual(alone);
    expect(chunked.liveSequences).toEqual([]);
  });
});
