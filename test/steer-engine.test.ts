import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { PrefillInput } from '../src/engine/step-plan.ts';
import type { AppliedEdit, GenerationRequest, GenerationResult, TokenEvent } from '../src/engine/generation.ts';
import { GREEDY } from '../src/sampling/sampler.ts';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import type { LowRankIntervention } from '../src/interventions/artifact.ts';
import { steer } from '../src/interventions/steer.ts';
import { ReftError } from '../src/errors.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { storiesEngine, testCacheDir } from './support/engine.ts';
import {
  appliedError,
  requestInterventions,
  steerArtifacts,
  steerCases,
  steeredRuns,
  topIds,
  type SteerCase,
  type SteeredRun,
} from './support/steer.ts';

/**
 * Request-time control in the engine (REFT.md "Request-time control", fixtures/steer): each
 * request item's strength, layers and positions, several artifacts in one request, and the
 * coefficients readout, against the reference cases on stories260k, on the host-cache engine.
 */
let model: LoadedModel;
let engine: StepRunner;
let artifacts: Map<string, LowRankIntervention[]>;
const STEPS = 20;
const TOLERANCE = 1e-4;
/** The largest coefficient error seen, reported at the end. */
let worst = 0;

beforeAll(async () => {
  ({ model, engine } = await storiesEngine());
  artifacts = await steerArtifacts(model.config);
});
afterAll(async () => {
  console.log(`steer-engine: max coefficient error ${worst.toExponential(2)}`);
  await engine?.close();
});

const row = (c: SteerCase): PrefillInput => ({
  tokens: c.input_ids,
  interventions: requestInterventions(artifacts, c.request),
  returnCoefficients: true,
});

function expectCase(c: SteerCase, run: SteeredRun): void {
  expect(run.greedy, c.name).toEqual(c.greedy_ids);
  expect(topIds(run.logits, 5), c.name).toEqual(c.last_logits_top5);
  const err = appliedError(run.applied, c.applied);
  worst = Math.max(worst, err);
  expect(err, c.name).toBeLessThan(TOLERANCE);
}

describe('steering at request time on the host-cache engine', () => {
  it('covers strengths, layers, positions and compositions', () => {
    expect(steerCases.length).toBe(10);
    expect(steerCases.some((c) => c.request.length === 3)).toBe(true);
  });

  for (const c of steerCases) {
    it(`${c.name} (${JSON.stringify(c.request)}) alone: greedy ids, top-5 and coefficients as the reference`, async () => {
      const [run] = await steeredRuns(engine, [row(c)], STEPS);
      expectCase(c, run);
    });
  }

  it('all cases in one batch, with a plain row and a row using an artifact as stored, each get their own result', async () => {
    const plain = { tokens: steerCases[0].input_ids };
    const stored = { tokens: steerCases[1].input_ids, interventions: artifacts.get('alpha')!, returnCoefficients: true };
    const runs = await steeredRuns(engine, [...steerCases.map(row), plain, stored], STEPS);
    steerCases.forEach((c, i) => expectCase(c, runs[i]));
    const [plainAlone] = await steeredRuns(engine, [plain], STEPS);
    const [storedAlone] = await steeredRuns(engine, [stored], STEPS);
    expect(runs.at(-2)!.greedy).toEqual(plainAlone.greedy);
    expect(runs.at(-2)!.applied).toBeUndefined();
    expect(runs.at(-1)!.greedy).toEqual(storedAlone.greedy);
    expect(appliedError(runs.at(-1)!.applied, storedAlone.applied!)).toBeLessThan(TOLERANCE);
    const [unsteered] = await steeredRuns(engine, [{ tokens: stored.tokens }], STEPS);
    expect(storedAlone.greedy).not.toEqual(unsteered.greedy); // the artifact matters for this prompt
  });

  it("strength 0 gives the base model's logits and tokens exactly; its coefficients are still reported", async () => {
    for (const c of steerCases) {
      const items = c.request.map((it) => ({ ...it, strength: 0 }));
      const [off] = await steeredRuns(
        engine,
        [{ tokens: c.input_ids, interventions: requestInterventions(artifacts, items), returnCoefficients: true }],
        STEPS,
      );
      const [base] = await steeredRuns(engine, [{ tokens: c.input_ids }], STEPS);
      expect(off.greedy, c.name).toEqual(base.greedy);
      expect(off.logits, c.name).toEqual(base.logits);
      const where = (applied: AppliedEdit[][] | undefined) => applied?.map((item) => item.map((e) => [e.layer, e.positions]));
      expect(where(off.applied), c.name).toEqual(where(c.applied)); // c(h) is reported before the strength
    }
    expect(steerCases.find((c) => c.name === 'case3')!.request[0].strength).toBe(0);
  });

  it('strength 1 gives exactly what the stored artifact gives alone', async () => {
    for (const c of steerCases) {
      const stored = { tokens: c.input_ids, interventions: artifacts.get('alpha')! };
      const [a] = await steeredRuns(engine, [stored], STEPS);
      const [b] = await steeredRuns(
        engine,
        [{ tokens: c.input_ids, interventions: steer(artifacts.get('alpha')!, { strength: 1 }) }],
        STEPS,
      );
      const [d] = await steeredRuns(engine, [{ tokens: c.input_ids, interventions: steer(artifacts.get('alpha')!) }], STEPS);
      expect(b.logits, c.name).toEqual(a.logits);
      expect(d.logits, c.name).toEqual(a.logits);
      expect(b.greedy, c.name).toEqual(a.greedy);
    }
  });

  it('the same artifact twice at 0.5 acts as once at 1 (strengths add on shared columns), and both report the same coefficients', async () => {
    const c = steerCases[6];
    const alpha = artifacts.get('alpha')!;
    const twice = [...steer(alpha, { strength: 0.5 }, 0), ...steer(alpha, { strength: 0.5 }, 1)];
    const [half] = await steeredRuns(engine, [{ tokens: c.input_ids, interventions: twice, returnCoefficients: true }], STEPS);
    const [once] = await steeredRuns(engine, [{ tokens: c.input_ids, interventions: alpha, returnCoefficients: true }], STEPS);
    expect(half.logits).toEqual(once.logits);
    expect(half.greedy).toEqual(once.greedy);
    expect(half.applied).toHaveLength(2);
    expect(half.applied![0]).toEqual(once.applied![0]);
    expect(half.applied![1]).toEqual(once.applied![0]);
  });

  it('a prompt prefilled in chunks reports every coefficient, gathered across its chunks', async () => {
    const chunked = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, prefillChunkTokens: 4 });
    try {
      const runs = await steeredRuns(chunked, steerCases.map(row), STEPS);
      steerCases.forEach((c, i) => expectCase(c, runs[i]));
    } finally {
      await chunked.close();
    }
  });

  it('steer(): layers keep the artifact order, positions override every intervention, a bad spec names its field', () => {
    const alpha = artifacts.get('alpha')!;
    const kept = steer(alpha, { layers: [3], positions: 'l1', strength: -2 }, 4);
    expect(kept.map((iv) => [iv.layer, iv.positions, iv.strength, iv.item, iv.key])).toEqual([
      [3, { first: 0, last: 1 }, -2, 4, 'alpha#1'],
    ]);
    expect(kept[0].down).toBe(alpha[1].down); // shared, not copied
    expect(alpha[1].positions).toEqual({ first: 2, last: 2 }); // the stored artifact is unchanged
    try {
      steer(alpha, { positions: 'x3' }, 2);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(ReftError);
      expect((e as ReftError).field).toBe('interventions.2.positions');
    }
  });
});

describe('the scheduler carries the readout', () => {
  const request = (c: SteerCase, returnCoefficients: boolean): GenerationRequest => ({
    tokens: c.input_ids,
    interventions: requestInterventions(artifacts, c.request),
    returnCoefficients,
    sampling: GREEDY,
    maxNewTokens: STEPS,
    stop: [],
    ignoreEos: true,
    logprobs: false,
    topLogprobs: 0,
  });

  it('in the first token event and the result, only for requests that asked', async () => {
    const scheduler = new Scheduler(engine, model.tokenizer, new Set(model.tokenizer.eosTokenIds), DEFAULT_LIMITS);
    const submit = (key: string, req: GenerationRequest) => {
      const events: TokenEvent[] = [];
      const done = new Promise<GenerationResult>((resolve, reject) =>
        scheduler.submit(key, req, { onToken: (e) => events.push(e), onDone: resolve, onError: reject }),
      );
      return { events, done };
    };
    const c = steerCases[7];
    const asked = submit('asked', request(c, true));
    const silent = submit('silent', request(c, false));
    const [a, s] = await Promise.all([asked.done, silent.done]);
    expect(a.tokens).toEqual(c.greedy_ids);
    expect(s.tokens).toEqual(c.greedy_ids);
    expect(appliedError(a.applied, c.applied)).toBeLessThan(TOLERANCE);
    expect(asked.events[0].applied).toEqual(a.applied);
    expect(asked.events.slice(1).every((e) => e.applied === undefined)).toBe(true);
    expect(s.applied).toBeUndefined();
    expect(silent.events.every((e) => e.applied === undefined)).toBe(true);
  });
});
