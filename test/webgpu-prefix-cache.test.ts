import { describe, expect, it } from 'vitest';
import { expectSameWithCache, prefixCacheSuite } from './support/prefix-cache.ts';

/**
 * The prefix cache with the KV cache on the WebGPU device (Mesa's llvmpipe here): blocks are
 * device tensors, sliced out of a row's cache and appended into a new row's; every reference
 * case as with the cache off (test/support/prefix-cache.ts), prefilled whole and in chunks of a
 * block. (Chunks that do not end on a block boundary sum a row's attention in another order than
 * a run that starts after cached blocks: 40-token chunks moved logprobs by up to 1.1e-5 here.)
 */
const suite = prefixCacheSuite(300_000);

describe('the prefix cache on the WebGPU device', () => {
  for (const chunk of [512, 64]) {
    it(`every reference, steer and pyreft case, prefilled in chunks of ${chunk}: cold, warm and warm from another request as with the cache off`, async () => {
      const device = await suite.runner({ device: 'webgpu', prefillChunkTokens: chunk });
      const worst = await expectSameWithCache(device, suite.model, suite.cases);
      expect(worst.cached).toBeGreaterThan(0);
      console.log(
        `prefix cache, WebGPU, chunks of ${chunk}: worst logprob difference ${worst.logprob.toExponential(2)}, coefficient ${worst.coefficient.toExponential(2)}`,
      );
    }, 300_000);
  }
});
