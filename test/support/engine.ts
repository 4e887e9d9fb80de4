import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StepRunner } from '../../src/engine/step-runner.ts';
import type { PrefillInput } from '../../src/engine/step-plan.ts';
import { argmax } from '../../src/sampling/sampler.ts';
import { loadModel, type LoadedModel } from '../../src/model/load.ts';
import { STORIES } from './fixtures.ts';

/** A fresh graph cache per test process: the model folder is read-only. */
export const testCacheDir = mkdtempSync(join(tmpdir(), 'reft-test-cache-'));

export async function storiesEngine(): Promise<{ model: LoadedModel; engine: StepRunner }> {
  const model = await loadModel(STORIES);
  const engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir });
  return { model, engine };
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Greedy continuations of every row, decoded together with the KV cache. */
export async function greedyBatch(engine: StepRunner, rows: readonly PrefillInput[], steps: number): Promise<number[][]> {
  const outs = await engine.prefill(rows);
  const gens = outs.map((o) => [argmax(o.logits)]);
  for (let s = 1; s < steps; s++) {
    const logits = await engine.decode(new Map(outs.map((o, i) => [o.id, gens[i].at(-1)!])));
    outs.forEach((o, i) => gens[i].push(argmax(logits.get(o.id)!)));
  }
  for (const o of outs) engine.release(o.id);
  return gens;
}
