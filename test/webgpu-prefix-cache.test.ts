import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';
import { expectSameWithCache, prefixCases, type PrefixCase } from './support/prefix-cache.ts';

/**
 * The prefix cache with the KV cache on the WebGPU device (Mesa's llvmpipe here): blocks are
 * device tensors, sliced out of a row's cache and appended into a new row's, every reference case
 * as with the cache off (test/support/prefix-cache.ts), whole and in chunks.
 */
let model: LoadedModel;
let cases: PrefixCase[];
let device: StepRunner;

beforeAll(async () => {
  model = await loadModel(STORIES);
  cases = await prefixCases(model);
  device = await StepRunner.create(model.config, model.checkpoint, {
    cacheDir: testCacheDir,
    device: 'webgpu',
    prefixCacheBytes: 8 * 2 ** 20,
    prefillChunkTokens: 40,
  });
}, 300_000);
afterAll(() => device?.close());

describe('the prefix cache on the WebGPU device', () => {
  it('every reference, steer and pyreft case (prefilled in chunks of 40): cold, warm and warm from another request as with the cache off', async () => {
    const worst = await expectSameWithCache(device, model, cases);
    expect(worst.cached).toBeGreaterThan(0);
    console.log(
      `prefix cache, WebGPU: worst logprob difference ${worst.logprob.toExponential(2)}, coefficient ${worst.coefficient.toExponential(2)}`,
    );
  }, 300_000);
});
