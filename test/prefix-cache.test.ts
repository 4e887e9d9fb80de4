import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';
import { expectSameWithCache, prefixCases, type PrefixCase } from './support/prefix-cache.ts';

/** The prefix cache on the CPU (host slabs): every reference case as with the cache off (test/support/prefix-cache.ts). */
let model: LoadedModel;
let cases: PrefixCase[];
const runners: StepRunner[] = [];

beforeAll(async () => {
  model = await loadModel(STORIES);
  cases = await prefixCases(model);
});
afterAll(async () => {
  for (const r of runners) await r.close();
});

const runner = async (prefillChunkTokens?: number) => {
  const r = await StepRunner.create(model.config, model.checkpoint, {
    cacheDir: testCacheDir,
    prefixCacheBytes: 8 * 2 ** 20,
    prefillChunkTokens,
  });
  runners.push(r);
  return r;
};

describe('the prefix cache on the CPU', () => {
  it('every reference, steer and pyreft case: cold, warm and warm from another request as with the cache off', async () => {
    expect(cases.length).toBeGreaterThan(20);
    const worst = await expectSameWithCache(await runner(), model, cases);
    console.log(
      `prefix cache, CPU: worst logprob difference ${worst.logprob.toExponential(2)}, coefficient ${worst.coefficient.toExponential(2)}`,
    );
  });

  it('with a chunked prefill (chunks of 40 tokens): the same', async () => {
    await expectSameWithCache(await runner(40), model, cases);
  });
});
