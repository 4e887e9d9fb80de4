import type { Rng } from '../rng.ts';

/**
 * Orthonormal rows for `rotate` [r, d]: initialisation as torch.nn.init.orthogonal_, and the
 * QR retraction that puts R back on the manifold after each optimizer step.
 */

/**
 * torch.nn.init.orthogonal_ on a [d, r] tensor (d > r) fills it with N(0, 1) row by row, takes
 * Q of its QR and flips columns so R's diagonal is positive; pyreft's rotate is that [d, r]
 * matrix and ours is its transpose. Gram–Schmidt on the columns gives exactly that Q (its
 * diagonal is positive by construction); the columns become our rows.
 */
export function orthogonalRows(rank: number, d: number, rng: Rng): Float32Array {
  if (rank > d) throw new Error(`rank ${rank} exceeds the hidden size ${d}: rows cannot be orthonormal`);
  const gaussian = new Float64Array(d * rank); // [d, r], row-major as torch fills it
  for (let i = 0; i < gaussian.length; i++) gaussian[i] = rng.normal();
  const rows = new Float64Array(rank * d);
  for (let j = 0; j < rank; j++) for (let i = 0; i < d; i++) rows[j * d + i] = gaussian[i * rank + j];
  gramSchmidtRows(rows, rank, d);
  return Float32Array.from(rows);
}

/** Replaces R's rows by the Q factor of their QR decomposition (positive diagonal), in place. */
export function retractRows(r: Float32Array, rank: number, d: number): void {
  const rows = Float64Array.from(r);
  gramSchmidtRows(rows, rank, d);
  r.set(rows);
}

/**
 * Modified Gram–Schmidt over rows, run twice ("twice is enough") so the result is orthonormal
 * to float64 precision even when the rows are nearly dependent.
 */
function gramSchmidtRows(m: Float64Array, rank: number, d: number): void {
  for (let pass = 0; pass < 2; pass++) {
    for (let i = 0; i < rank; i++) {
      const ri = i * d;
      for (let j = 0; j < i; j++) {
        const rj = j * d;
        let dot = 0;
        for (let k = 0; k < d; k++) dot += m[ri + k] * m[rj + k];
        for (let k = 0; k < d; k++) m[ri + k] -= dot * m[rj + k];
      }
      let norm = 0;
      for (let k = 0; k < d; k++) norm += m[ri + k] * m[ri + k];
      norm = Math.sqrt(norm);
      if (!(norm > 1e-30)) throw new Error('rotate has linearly dependent rows');
      for (let k = 0; k < d; k++) m[ri + k] /= norm;
    }
  }
}
