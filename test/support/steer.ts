import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { LowRankIntervention } from '../../src/interventions/artifact.ts';
import { readArtifactDir } from '../../src/interventions/directory.ts';
import { steer, type RequestIntervention } from '../../src/interventions/steer.ts';
import type { PrefillInput } from '../../src/engine/step-plan.ts';
import type { StepRunner } from '../../src/engine/step-runner.ts';
import type { AppliedEdit } from '../../src/engine/generation.ts';
import { argmax } from '../../src/sampling/sampler.ts';
import type { ModelConfig } from '../../src/model/config.ts';
import { FIXTURES } from './fixtures.ts';

/** fixtures/steer (REFT.md "Request-time control"): reference cases and their reft/v1 artifacts. */
export const STEER = join(FIXTURES, 'steer');

export interface SteerItem {
  intervention: string;
  strength?: number;
  layers?: number[];
  positions?: string;
}

export interface SteerCase {
  name: string;
  input_ids: number[];
  request: SteerItem[];
  greedy_ids: number[];
  last_logits_top5: number[];
  applied: AppliedEdit[][];
}

export const steerCases: SteerCase[] = JSON.parse(readFileSync(join(STEER, 'cases.json'), 'utf8')).cases;

/**
 * The fixture artifacts by name, loaded with the artifact loader and keyed as the adapter cache
 * keys them (one key per intervention of an artifact), so rows share their rank columns.
 */
export async function steerArtifacts(config: ModelConfig): Promise<Map<string, LowRankIntervention[]>> {
  const out = new Map<string, LowRankIntervention[]>();
  for (const name of ['alpha', 'beta', 'gamma']) {
    const artifact = await readArtifactDir(join(STEER, 'artifacts', name), { hiddenSize: config.hiddenSize, numLayers: config.numLayers });
    out.set(
      name,
      artifact.interventions.map((iv, i) => ({ ...iv, key: `${name}#${i}` })),
    );
  }
  return out;
}

/** A request's list of items as the engine takes it. */
export function requestInterventions(artifacts: Map<string, LowRankIntervention[]>, items: readonly SteerItem[]): RequestIntervention[] {
  return items.flatMap((it, i) =>
    steer(artifacts.get(it.intervention)!, { strength: it.strength, layers: it.layers, positions: it.positions }, i),
  );
}

/** The largest |difference| between two readouts of the same shape (which it checks). */
export function appliedError(got: AppliedEdit[][] | undefined, want: AppliedEdit[][]): number {
  if (!got || got.length !== want.length) throw new Error(`applied has ${got?.length} items, want ${want.length}`);
  let worst = 0;
  want.forEach((edits, i) => {
    if (got[i].length !== edits.length) throw new Error(`item ${i}: ${got[i].length} edits, want ${edits.length}`);
    edits.forEach((e, j) => {
      const g = got[i][j];
      if (g.layer !== e.layer || JSON.stringify(g.positions) !== JSON.stringify(e.positions)) {
        throw new Error(`item ${i} edit ${j}: layer ${g.layer} at ${g.positions}, want layer ${e.layer} at ${e.positions}`);
      }
      e.coefficients.forEach((v, p) => {
        if (g.coefficients[p]?.length !== v.length)
          throw new Error(`item ${i} edit ${j} position ${p}: ${g.coefficients[p]?.length} values`);
        v.forEach((x, k) => (worst = Math.max(worst, Math.abs(g.coefficients[p][k] - x))));
      });
    });
  });
  return worst;
}

/** Token ids of the `n` largest logits, best first. */
export function topIds(logits: Float32Array, n: number): number[] {
  return [...logits.keys()].sort((a, b) => logits[b] - logits[a]).slice(0, n);
}

export interface SteeredRun {
  greedy: number[];
  /** The last prompt position's logits. */
  logits: Float32Array;
  applied?: AppliedEdit[][];
}

/** Prefills `rows` together, then decodes them greedily together for `steps` tokens in all. */
export async function steeredRuns(engine: StepRunner, rows: readonly PrefillInput[], steps: number): Promise<SteeredRun[]> {
  const outs = await engine.prefill(rows);
  const runs = outs.map((o) => ({ greedy: [argmax(o.logits)], logits: o.logits, applied: o.applied }));
  for (let s = 1; s < steps; s++) {
    const logits = await engine.decode(new Map(outs.map((o, i) => [o.id, runs[i].greedy.at(-1)!])));
    outs.forEach((o, i) => runs[i].greedy.push(argmax(logits.get(o.id)!)));
  }
  for (const o of outs) engine.release(o.id);
  return runs;
}
