import type { InterventionSpec } from '../interventions/artifact.ts';
import { packBatch, type DropoutOptions, type LayerFactors, type StackLayout, type TrainingExample } from './batch.ts';
import { kindGradients, type KindTensors } from './kinds.ts';
import type { StepSession } from './step-session.ts';

/** What one step's passes share: the graph, the stacked interventions and their current factors. */
export interface StepContext {
  graph: StepSession;
  specs: readonly InterventionSpec[];
  layout: StackLayout;
  factors: LayerFactors;
  hiddenSize: number;
}

/**
 * One step's loss and gradients over several passes (micro-batches): the mean −log p over every
 * completion token of all of them, so a batch split to fit memory gives the whole batch's result
 * (up to float rounding). Each pass's loss is its own token mean, weighted by its share of the
 * step's scored tokens. `grads` (per intervention, per tensor) is overwritten.
 */
export async function accumulateGradients(
  step: StepContext,
  passes: readonly (readonly TrainingExample[])[],
  grads: KindTensors[],
  dropout?: DropoutOptions,
): Promise<{ loss: number; tokens: number }> {
  const { graph, specs, layout, factors, hiddenSize: d } = step;
  const scored = passes.map((examples) => examples.reduce((s, e) => s + e.tokens.length - e.promptLength, 0));
  const totalScored = scored.reduce((a, b) => a + b, 0);
  for (const t of grads) for (const g of Object.values(t)) g.fill(0);
  let loss = 0;
  let tokens = 0;
  for (const [m, examples] of passes.entries()) {
    tokens += examples.reduce((s, e) => s + e.tokens.length, 0);
    const res = await graph.run(packBatch(examples, layout, factors, d, dropout));
    const w = totalScored > 0 ? scored[m] / totalScored : 0;
    loss += w * res.loss;
    specs.forEach((s, i) => {
      const g = kindGradients(s.kind, s.rank, d, layout.slotOf(i).offset, res.grads.get(s.layer)!);
      for (const [name, v] of Object.entries(g)) {
        const acc = grads[i][name];
        for (let k = 0; k < v.length; k++) acc[k] += w * v[k];
      }
    });
  }
  return { loss, tokens };
}
