import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import type { GenerationRequest, GenerationResult } from '../../src/engine/generation.ts';
import { PREFIX_BLOCK_TOKENS, firstEditedPosition } from '../../src/prefix-cache/block-keys.ts';
import { GREEDY } from '../../src/sampling/sampler.ts';
import { DEFAULT_LIMITS, Scheduler } from '../../src/engine/scheduler.ts';
import { StepRunner } from '../../src/engine/step-runner.ts';
import { readArtifactDir } from '../../src/interventions/directory.ts';
import type { RequestIntervention } from '../../src/interventions/steer.ts';
import { loadModel, type LoadedModel } from '../../src/model/load.ts';
import type { Device } from '../../src/runtime/session.ts';
import { testCacheDir } from './engine.ts';
import { FIXTURES, STORIES, inferenceCases } from './fixtures.ts';
import { appliedError, requestInterventions, steerArtifacts, steerCases } from './steer.ts';

/**
 * The prefix cache's exactness (issue 25): every reference case (fixtures/reference, the steer
 * cases with strength, layer subsets, position overrides and several artifacts, the pyreft
 * conversions), its prompt behind a long shared prefix, gives with the cache on what it gives
 * with it off: the same greedy tokens, logprobs within 1e-5, the same coefficients. Cold (the
 * cache empty), warm (the same request again) and warm from another request (one sharing the
 * prefix ran first), through the scheduler and a real runner.
 */
export interface PrefixCase {
  name: string;
  interventions: RequestIntervention[];
  returnCoefficients: boolean;
}

/**
 * A suite over stories260k and its prefix cases: loads them before its tests, gives runners with
 * an 8 MiB prefix cache, and closes them after.
 */
export function prefixCacheSuite(loadTimeoutMs?: number) {
  let model: LoadedModel;
  let cases: PrefixCase[];
  const runners: StepRunner[] = [];
  beforeAll(async () => {
    model = await loadModel(STORIES);
    cases = await prefixCases(model);
  }, loadTimeoutMs);
  afterAll(async () => {
    for (const r of runners) await r.close();
  });
  return {
    get model() {
      return model;
    },
    get cases() {
      return cases;
    },
    async runner(opts: { device?: Device; prefillChunkTokens?: number } = {}): Promise<StepRunner> {
      const r = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, prefixCacheBytes: 8 * 2 ** 20, ...opts });
      runners.push(r);
      return r;
    },
  };
}

export async function prefixCases(model: LoadedModel): Promise<PrefixCase[]> {
  const out: PrefixCase[] = inferenceCases().map((c) => ({
    name: `reference ${c.name}`,
    interventions: c.interventions,
    returnCoefficients: false,
  }));
  const artifacts = await steerArtifacts(model.config);
  for (const c of steerCases) {
    out.push({ name: `steer ${c.name}`, interventions: requestInterventions(artifacts, c.request), returnCoefficients: true });
  }
  const manifest = JSON.parse(readFileSync(join(FIXTURES, 'pyreft', 'manifest.json'), 'utf8')) as Record<string, { expect: string }>;
  for (const [folder, c] of Object.entries(manifest)) {
    if (c.expect !== 'ok') continue;
    const base = { hiddenSize: model.config.hiddenSize, numLayers: model.config.numLayers };
    const artifact = await readArtifactDir(join(FIXTURES, 'pyreft', folder, 'expected'), base);
    out.push({ name: `pyreft ${folder}`, interventions: artifact.interventions, returnCoefficients: false });
  }
  return out;
}

const STEPS = 6;
const TOLERANCE = 1e-5;

/** Runs every case cold, warm and warm from another request against the cache off; returns the worst differences seen. */
export async function expectSameWithCache(
  runner: StepRunner,
  model: LoadedModel,
  cases: readonly PrefixCase[],
): Promise<{ logprob: number; coefficient: number; cached: number }> {
  const scheduler = new Scheduler(runner, model.tokenizer, new Set(model.tokenizer.eosTokenIds), DEFAULT_LIMITS);
  const prefix = model.tokenizer.encode(
    'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. One day, they saw a big red ball under a tree. Lily ran to get it, but Max was faster. They played all day until the sun went down, and then they went home to eat dinner with Mom and Dad. After dinner, Lily told Mom about the big red ball and the fast dog. Mom smiled and said that Max was a good friend. Lily gave Max a hug and went to bed, happy and tired.',
  );
  expect(prefix.length).toBeGreaterThan(2 * PREFIX_BLOCK_TOKENS);
  const tail = (s: string) => model.tokenizer.encode(s).slice(1); // without its BOS
  let runs = 0;
  const run = (tokens: number[], c: PrefixCase, namespace?: string) =>
    new Promise<GenerationResult>((resolve, reject) => {
      const request: GenerationRequest = {
        tokens,
        interventions: c.interventions,
        returnCoefficients: c.returnCoefficients,
        sampling: GREEDY,
        maxNewTokens: STEPS,
        stop: [],
        ignoreEos: true,
        logprobs: true,
        topLogprobs: 0,
        ...(namespace ? { prefixCache: { namespace } } : {}),
      };
      scheduler.submit(`run-${runs++}`, request, { onToken() {}, onDone: resolve, onError: reject });
    });
  const worst = { logprob: 0, coefficient: 0, cached: 0 };
  for (const [i, c] of cases.entries()) {
    const tokens = [...prefix, ...tail('Tom saw a cat.')];
    const other = [...prefix, ...tail('The bird sang a happy song in the morning.')];
    const off = await run(tokens, c);
    const cold = await run(tokens, c, `case ${i}`);
    const warm = await run(tokens, c, `case ${i}`);
    await run(other, c, `case ${i} other`);
    const fromOther = await run(tokens, c, `case ${i} other`);
    // what the cache may hold of this prompt: every full block before the last token, and with
    // the coefficients asked for only those before the first edit
    const blocks = Math.floor((tokens.length - 1) / PREFIX_BLOCK_TOKENS);
    const usable = c.returnCoefficients
      ? Math.min(blocks, Math.floor(firstEditedPosition(c.interventions, tokens.length) / PREFIX_BLOCK_TOKENS))
      : blocks;
    expect(cold.cachedTokens, c.name).toBe(0);
    expect(warm.cachedTokens, c.name).toBe(usable * PREFIX_BLOCK_TOKENS);
    worst.cached = Math.max(worst.cached, warm.cachedTokens);
    for (const [name, r] of [
      ['cold', cold],
      ['warm', warm],
      ['warm from another request', fromOther],
    ] as const) {
      expect(r.tokens, `${c.name}, ${name}`).toEqual(off.tokens);
      r.logprobs!.forEach((lp, k) => (worst.logprob = Math.max(worst.logprob, Math.abs(lp.logprob - off.logprobs![k].logprob))));
      if (c.returnCoefficients) worst.coefficient = Math.max(worst.coefficient, appliedError(r.applied, off.applied!));
    }
  }
  await scheduler.idle();
  expect(worst.logprob).toBeLessThan(TOLERANCE);
  expect(worst.coefficient).toBeLessThan(TOLERANCE);
  expect(runner.liveSequences).toEqual([]);
  return worst;
}
