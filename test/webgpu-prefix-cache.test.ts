import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';
import { expectSameWithCache, prefixCases, type PrefixCase } from './support/prefix-cache.ts';

/**
 * The prefix cache with the KV cache on the WebGPU device (Mesa's llvmpipe here): blocks are
 * device tensors, sliced out of a row's cache and appended into a new row's; every reference
 * case as with the cache off (test/support/prefix-cache.ts), prefilled whole and in chunks of a
 * block. (Chunks that do not end on a block boundary sum a row's attention in another order than
 * a run that starts after cached blocks: 40-token chunks moved logprobs by up to 1.1e-5 here.)
 */
let model: LoadedModel;
let cases: PrefixCase[];
const runners: StepRunner[] = [];

beforeAll(async () => {
  model = await loadModel(STORIES);
  cases = await prefixCases(model);
}, 300_000);
afterAll(async () => {
  for (const r of runners) await r.close();
});

describe('the prefix cache on the WebGPU device', () => {
  for (const chunk of [512, 64]) {
    it(`every reference, steer and pyreft case, prefilled in chunks of ${chunk}: cold, warm and warm from another request as with the cache off`, async () => {
      const device = await StepRunner.create(model.config, model.checkpoint, {
        cacheDir: testCacheDir,
        device: 'webgpu',
        prefixCacheBytes: 8 * 2 ** 20,
        prefillChunkTokens: chunk,
      });
      runners.push(device);
      const worst = await expectSameWithCache(device, model, cases);
      expect(worst.cached).toBeGreaterThan(0);
      console.log(
        `prefix cache, WebGPU, chunks of ${chunk}: worst logprob difference ${worst.logprob.toExponential(2)}, coefficient ${worst.coefficient.toExponential(2)}`,
      );
    }, 300_000);
  }
});
