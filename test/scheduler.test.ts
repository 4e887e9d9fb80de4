import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { GenerationRequest, GenerationResult } from '../src/engine/generation.ts';
import { GREEDY } from '../src/sampling/sampler.ts';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { greedyBatch, testCacheDir } from './support/engine.ts';
import { STORIES, inferenceCases } from './support/fixtures.ts';

/**
 * The scheduler over a real engine on stories260k, with a prefill chunk of 8 tokens so that a
 * paragraph is a "long" prompt: it must be prefilled a chunk per step while the running
 * sequences keep decoding, and everyone must still get what they get alone.
 */
let model: LoadedModel;
let engine: StepRunner;
let scheduler: Scheduler;
const cases = inferenceCases();

beforeAll(async () => {
  model = await loadModel(STORIES);
  engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, prefillChunkTokens: 8 });
  scheduler = new Scheduler(engine, model.tokenizer, new Set(model.tokenizer.eosTokenIds), DEFAULT_LIMITS);
});
afterAll(() => engine?.close());

const request = (tokens: number[], maxNewTokens: number, interventions = cases[0].interventions): GenerationRequest => ({
  tokens,
  interventions,
  sampling: GREEDY,
  maxNewTokens,
  stop: [],
  ignoreEos: true,
  logprobs: false,
  topLogprobs: 0,
});

describe('scheduler with long prompts', () => {
  it('a long prompt is prefilled chunk by chunk while a running stream keeps decoding; both get what they get alone', async () => {
    const shortPrompt = model.tokenizer.encode('Once upon a time');
    const longPrompt = model.tokenizer.encode(
      'Tom and his dog went to the park. They played with a red ball all day. Then it began to rain, so they ran home.',
    );
    expect(shortPrompt.length).toBeLessThanOrEqual(8);
    expect(longPrompt.length).toBeGreaterThan(24); // at least 4 chunks
    const events: string[] = [];
    const done = (name: string, req: GenerationRequest) =>
      new Promise<GenerationResult>((resolve, reject) =>
        scheduler.submit(name, req, { onToken: () => events.push(name), onDone: resolve, onError: reject }),
      );
    const short = done('short', request(shortPrompt, 40));
    // let the short one start decoding before the long one arrives
    while (events.length < 2) await new Promise((r) => setTimeout(r, 1));
    const long = done('long', request(longPrompt, 6, cases[3].interventions));
    const [s, l] = await Promise.all([short, long]);

    const firstLong = events.indexOf('long');
    const shortBeforeLong = events.slice(2, firstLong).filter((e) => e === 'short').length;
    expect(shortBeforeLong).toBeGreaterThanOrEqual(Math.ceil(longPrompt.length / 8) - 1);
    const [aloneShort, aloneLong] = [
      (await greedyBatch(engine, [{ tokens: shortPrompt }], 40))[0],
      (await greedyBatch(engine, [{ tokens: longPrompt, interventions: cases[3].interventions }], 6))[0],
    ];
    expect(s.tokens).toEqual(aloneShort);
    expect(l.tokens).toEqual(aloneLong);
    expect(engine.liveSequences).toEqual([]);
  });

  it('a prompt being prefilled counts against the batch size', async () => {
    const small = new Scheduler(engine, model.tokenizer, new Set(model.tokenizer.eosTokenIds), { ...DEFAULT_LIMITS, maxBatchSize: 2 });
    const longPrompt = model.tokenizer.encode('Tom and his dog went to the park. They played with a red ball all day.');
    let most = 0;
    const run = (name: string, tokens: number[], n: number) =>
      new Promise<GenerationResult>((resolve, reject) =>
        small.submit(name, request(tokens, n), {
          onToken: () => (most = Math.max(most, small.stats().running)),
          onDone: resolve,
          onError: reject,
        }),
      );
    const a = run('a', model.tokenizer.encode('Once upon a time'), 30);
    const b = run('b', longPrompt, 4);
    const c = run('c', model.tokenizer.encode('The cat'), 4);
    const [ra, rb, rc] = await Promise.all([a, b, c]);
    expect(most).toBeLessThanOrEqual(2);
    expect(rb.tokens).toEqual((await greedyBatch(engine, [{ tokens: longPrompt }], 4))[0]);
    expect(rc.tokens).toEqual((await greedyBatch(engine, [{ tokens: model.tokenizer.encode('The cat') }], 4))[0]);
    expect(ra.tokens).toHaveLength(30);
  });

  it('a long prompt cancelled mid-prefill frees its row, and the next one runs', async () => {
    const longPrompt = model.tokenizer.encode('The little cat sat on the mat and looked at the big blue sky for a long, long time.');
    expect(longPrompt.length).toBeGreaterThan(16);
    const cancelled = new Promise<GenerationResult>((resolve, reject) =>
      scheduler.submit('gone', request(longPrompt, 5), { onToken() {}, onDone: resolve, onError: reject }),
    );
    scheduler.cancel('gone');
    expect((await cancelled).finishReason).toBe('cancelled');
    const next = await new Promise<GenerationResult>((resolve, reject) =>
      scheduler.submit('next', request(longPrompt, 5), { onToken() {}, onDone: resolve, onError: reject }),
    );
    expect(next.tokens).toEqual((await greedyBatch(engine, [{ tokens: longPrompt }], 5))[0]);
    await scheduler.idle();
    expect(engine.liveSequences).toEqual([]);
  });
});

describe('tenants take turns for batch slots', () => {
  it("with one tenant's requests queued first, another tenant's request is admitted at the next free slot", async () => {
    const one = new Scheduler(engine, model.tokenizer, new Set(model.tokenizer.eosTokenIds), { ...DEFAULT_LIMITS, maxBatchSize: 1 });
    const prompt = model.tokenizer.encode('Once upon a time');
    const started: string[] = [];
    const run = (name: string, tenant: string) =>
      new Promise<GenerationResult>((resolve, reject) =>
        one.submit(
          name,
          { ...request(prompt, 3), tenant },
          {
            onToken: () => {
              if (!started.includes(name)) started.push(name);
            },
            onDone: resolve,
            onError: reject,
          },
        ),
      );
    // a1 takes the one slot; a2..a4 queue before b1 arrives, then b1 and a5
    const all = [run('a1', 'a'), run('a2', 'a'), run('a3', 'a'), run('a4', 'a'), run('b1', 'b'), run('a5', 'a')];
    await Promise.all(all);
    expect(started).toEqual(['a1', 'b1', 'a2', 'a3', 'a4', 'a5']);
  });
});
