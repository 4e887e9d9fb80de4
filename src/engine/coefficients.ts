import { positionsFor } from '../interventions/positions.ts';
import type { RequestIntervention } from '../interventions/steer.ts';
import type { AppliedEdit } from './generation.ts';
import type { LayerInterventionFeed } from './intervention-feeds.ts';
import type { PrefillInput, PrefillOutput } from './step-plan.ts';

/**
 * One prompt's readout (REFT.md "Request-time control"): each of its interventions'
 * coefficients at each of its positions, gathered from the graph's per-layer coefficients
 * output over the prefill steps (chunks) that covered them.
 */
export class CoefficientReadout {
  /** Per intervention, its positions and one vector per position (filled as steps run). */
  private readonly edits: Array<{ positions: number[]; vectors: number[][] }>;

  constructor(
    private readonly interventions: readonly RequestIntervention[],
    promptLength: number,
  ) {
    this.edits = interventions.map((iv) => ({ positions: positionsFor(iv.positions, promptLength), vectors: [] }));
  }

  /** Takes row `row`'s cells of a step's layer feeds, whose coefficients output is `coefficients[l]` ([K, R]). */
  record(row: number, feeds: readonly LayerInterventionFeed[], coefficients: readonly Float32Array[]): void {
    feeds.forEach((feed, l) => {
      for (const cell of feed.readout) {
        if (cell.row !== row) continue;
        const edit = this.edits[cell.intervention];
        const at = cell.k * feed.r + cell.column;
        edit.vectors[edit.positions.indexOf(cell.position)] = Array.from(coefficients[l].subarray(at, at + cell.rank));
      }
    });
  }

  /** Per request item (by `item`, in item order), per intervention of it in the order given. */
  applied(): AppliedEdit[][] {
    const items: AppliedEdit[][] = [];
    this.interventions.forEach((iv, i) => {
      const item = iv.item ?? 0;
      while (items.length <= item) items.push([]);
      const { positions, vectors } = this.edits[i];
      items[item].push({ layer: iv.layer, positions, coefficients: vectors });
    });
    return items;
  }
}

/** A readout for a prompt that asked for its coefficients. */
export function readoutFor(input: PrefillInput): CoefficientReadout | null {
  if (!input.returnCoefficients) return null;
  return new CoefficientReadout(input.interventions ?? [], input.promptLength ?? input.tokens.length);
}

/** The output with `applied` when its prompt asked for it. */
export function withApplied(output: PrefillOutput, readout: CoefficientReadout | null): PrefillOutput {
  return readout ? { ...output, applied: readout.applied() } : output;
}
