import { describe, expect, it } from 'vitest';
import { expectSameWithCache, prefixCacheSuite } from './support/prefix-cache.ts';

/** The prefix cache on the CPU (host slabs): every reference case as with the cache off (test/support/prefix-cache.ts). */
const suite = prefixCacheSuite();

describe('the prefix cache on the CPU', () => {
  it('every reference, steer and pyreft case: cold, warm and warm from another request as with the cache off', async () => {
    expect(suite.cases.length).toBeGreaterThan(20);
    const worst = await expectSameWithCache(await suite.runner(), suite.model, suite.cases);
    console.log(
      `prefix cache, CPU: worst logprob difference ${worst.logprob.toExponential(2)}, coefficient ${worst.coefficient.toExponential(2)}`,
    );
  });

  it('with a chunked prefill (chunks of 40 tokens): the same', async () => {
    await expectSameWithCache(await suite.runner({ prefillChunkTokens: 40 }), suite.model, suite.cases);
  });
});
