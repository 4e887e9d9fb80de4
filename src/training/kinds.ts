import { KIND_TENSORS, lowRank, type InterventionKind } from '../interventions/artifact.ts';
import { orthogonalRows } from './orthogonal.ts';
import type { Rng } from '../rng.ts';
import type { LowRankFactors } from './step-session.ts';

/**
 * What each kind's tensors mean for training: how they fold into the graph's low-rank form
 * delta = (h·downᵀ + bias)·up, how the low-rank gradients map back onto them, and how pyreft
 * initialises them.
 *
 *   kind      down        up     so              d(tensor)
 *   loreft    W − R       R      dW = dDown,     dR = dUp − dDown
 *   direft    W1          W2     dW1 = dDown,    dW2 = dUp
 *   noreft    W1 − W2     W2     dW1 = dDown,    dW2 = dUp − dDown
 *   consreft  −R          R      dR = dUp − dDown
 *   lobireft  0           R      dR = dUp
 * and d(source.bias) = dBias for all.
 */
export type KindTensors = Record<string, Float32Array>;

/** Kinds whose `rotate` must keep orthonormal rows. */
export const hasRotation = (kind: InterventionKind): boolean => KIND_TENSORS[kind].includes('rotate');

/** The tensor that plays S (subtracted from down, the `up` factor) for each kind, if any. */
const UP_TENSOR: Record<InterventionKind, string> = {
  loreft: 'rotate',
  direft: 'proj.weight',
  noreft: 'proj.weight',
  consreft: 'rotate',
  lobireft: 'rotate',
};
/** Whether down = source − up (the subtraction of h·Rᵀ in the edit). */
const SUBTRACTS: Record<InterventionKind, boolean> = { loreft: true, direft: false, noreft: true, consreft: true, lobireft: false };

export function tensorShape(name: string, rank: number, d: number): number[] {
  return name === 'source.bias' ? [rank] : [rank, d];
}

/**
 * Writes one intervention's factors into rows [offset, offset + rank) of a layer's stack,
 * folded by the engine's own `lowRank`, so training edits exactly as inference will (layer and
 * positions play no part in the fold).
 */
export function writeLowRank(kind: InterventionKind, t: KindTensors, rank: number, d: number, offset: number, out: LowRankFactors): void {
  const f = lowRank({ kind, rank, layer: 0, positions: { first: 0, last: 0 } }, t, d);
  out.down.set(f.down, offset * d);
  out.up.set(f.up, offset * d);
  out.bias.set(f.bias, offset);
}

/** The gradient of each of the kind's tensors from the stacked low-rank gradients. */
export function kindGradients(kind: InterventionKind, rank: number, d: number, offset: number, g: LowRankFactors): KindTensors {
  const n = rank * d;
  const dDown = g.down.subarray(offset * d, offset * d + n);
  const dUp = g.up.subarray(offset * d, offset * d + n);
  const out: KindTensors = { 'source.bias': g.bias.slice(offset, offset + rank) };
  if (KIND_TENSORS[kind].includes('source.weight')) out['source.weight'] = dDown.slice();
  out[UP_TENSOR[kind]] = SUBTRACTS[kind] ? dUp.map((v, i) => v - dDown[i]) : dUp.slice();
  return out;
}

/**
 * pyreft's initialisation:
 * - rotate: torch.nn.init.orthogonal_ on the [d, r] rotate layer (QR of a Gaussian matrix,
 *   signs fixed so R's diagonal is positive); ours is its transpose, rows orthonormal.
 * - source.weight, source.bias: nn.Linear(d, r) defaults, kaiming_uniform(a=√5) for the weight,
 *   i.e. U(−1/√d, 1/√d), and U(−1/√fan_in, 1/√fan_in) = the same bound for the bias.
 * - proj.weight: NodireftIntervention / NoreftIntervention's proj_layer is nn.Linear(d, r) as
 *   well; its weight is [r, d], exactly our proj.weight, so U(−1/√d, 1/√d) with no transpose.
 * - consreft / lobireft source.bias: torch.rand(r), U(0, 1).
 */
export function initialTensors(kind: InterventionKind, rank: number, d: number, rng: Rng): KindTensors {
  const bound = 1 / Math.sqrt(d);
  const uniform = (n: number, lo: number, hi: number) => Float32Array.from({ length: n }, () => rng.uniform(lo, hi));
  const out: KindTensors = {};
  for (const name of KIND_TENSORS[kind]) {
    if (name === 'rotate') out.rotate = orthogonalRows(rank, d, rng);
    else if (name === 'source.bias')
      out[name] = kind === 'consreft' || kind === 'lobireft' ? uniform(rank, 0, 1) : uniform(rank, -bound, bound);
    else out[name] = uniform(rank * d, -bound, bound);
  }
  return out;
}
