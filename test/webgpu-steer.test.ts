import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { LowRankIntervention } from '../src/interventions/artifact.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { STORIES } from './support/fixtures.ts';
import { testCacheDir } from './support/engine.ts';
import { appliedError, requestInterventions, steerArtifacts, steerCases, steeredRuns, topIds } from './support/steer.ts';

/**
 * Request-time control on the device-cache engine (ORT's WebGPU provider, Mesa's llvmpipe
 * here): a few fixtures/steer cases in one batch, one of them long enough (prefill chunks of
 * 12 tokens) to be prefilled in chunks. The coefficients come back only for rows that ask.
 */
let model: LoadedModel;
let device: StepRunner;
let artifacts: Map<string, LowRankIntervention[]>;
const chosen = ['case7', 'case9', 'case8'].map((name) => steerCases.find((c) => c.name === name)!);

beforeAll(async () => {
  model = await loadModel(STORIES);
  artifacts = await steerArtifacts(model.config);
  device = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, device: 'webgpu', prefillChunkTokens: 12 });
}, 600_000);
afterAll(async () => {
  await device?.close();
});

describe('steering at request time on the WebGPU device cache', () => {
  it('three cases (one prefilled in chunks) and a plain row: greedy ids, top-5 and coefficients as the reference', async () => {
    expect(chosen.map((c) => c.input_ids.length > 12)).toEqual([false, false, true]);
    const rows = chosen.map((c) => ({
      tokens: c.input_ids,
      interventions: requestInterventions(artifacts, c.request),
      returnCoefficients: true,
    }));
    const runs = await steeredRuns(device, [...rows, { tokens: chosen[0].input_ids }], 20);
    let worst = 0;
    chosen.forEach((c, i) => {
      expect(runs[i].greedy, c.name).toEqual(c.greedy_ids);
      expect(topIds(runs[i].logits, 5), c.name).toEqual(c.last_logits_top5);
      worst = Math.max(worst, appliedError(runs[i].applied, c.applied));
    });
    console.log(`webgpu-steer: max coefficient error ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);
    expect(runs[3].applied).toBeUndefined();
    expect(device.liveSequences).toEqual([]);
  });

  it('a prefill that edits but reports nothing downloads only its logits, token and logprob', async () => {
    const c = chosen[0];
    const interventions = requestInterventions(artifacts, c.request);
    const [silent] = await device.prefill([{ tokens: c.input_ids, interventions }]);
    device.release(silent.id);
    const vocab = model.config.vocabSize;
    expect(device.lastTransfer.downloaded).toBe(vocab * 4 + 8 + 4);
    const [asked] = await device.prefill([{ tokens: c.input_ids, interventions, returnCoefficients: true }]);
    device.release(asked.id);
    // every layer's [K, R] coefficients: K edited positions, R the ranks stacked on that layer
    const layers = new Map<number, { positions: Set<number>; rank: number }>();
    for (const item of c.applied) {
      for (const e of item) {
        const at = layers.get(e.layer) ?? { positions: new Set(), rank: 0 };
        e.positions.forEach((p) => at.positions.add(p));
        at.rank += e.coefficients[0].length;
        layers.set(e.layer, at);
      }
    }
    const coefficientBytes = [...layers.values()].reduce((n, l) => n + 4 * l.positions.size * l.rank, 0);
    expect(device.lastTransfer.downloaded).toBe(vocab * 4 + 8 + 4 + coefficientBytes);
    expect(asked.logits).toEqual(silent.logits);
  });
});
