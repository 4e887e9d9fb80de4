/**
 * torch's orthogonal parametrization (`torch.nn.utils.parametrizations.orthogonal`, Householder
 * map with trivialization), which pyreft's rotate layers use. The state dict stores the
 * unconstrained `original` X [n, k] (n > k) and the `base` B [n, n]; the weight is
 *   W = B · (Q · diag(trunc(X[j][j]))),  Q = first k columns of H₁…H_k,
 *   Hⱼ = I − τⱼ vⱼ vⱼᵀ,  vⱼ = eⱼ + (strictly-lower part of column j of X),  τⱼ = 2 / (1 + ‖that part‖²).
 * Everything here runs in float64 (the inputs are exact); the caller rounds to F32 once.
 */

/** Row-major matrix. */
export interface Matrix {
  rows: number;
  cols: number;
  data: Float64Array;
}

/** W [n, k] from X [n, k] and B [n, n]. Requires n > k (a square X would use matrix_exp). */
export function orthogonalWeight(original: Matrix, base: Matrix): Matrix {
  const { rows: n, cols: k } = original;
  if (!(n > k) || base.rows !== n || base.cols !== n) throw new Error('orthogonalWeight: expects X [n, k] with n > k and B [n, n]');
  const q = householderColumns(original);
  scaleColumnsBySignOfDiagonal(q, original);
  return multiply(base, q);
}

/** Q = H₁…H_k · I[:, :k], applying H_k first. */
function householderColumns(x: Matrix): Matrix {
  const { rows: n, cols: k } = x;
  const q: Matrix = { rows: n, cols: k, data: new Float64Array(n * k) };
  for (let j = 0; j < k; j++) q.data[j * k + j] = 1;
  for (let j = k - 1; j >= 0; j--) applyReflector(q, reflector(x, j));
  return q;
}

/** vⱼ and τⱼ for column j of X. */
function reflector(x: Matrix, j: number): { v: Float64Array; tau: number } {
  const v = new Float64Array(x.rows);
  v[j] = 1;
  let norm2 = 0;
  for (let i = j + 1; i < x.rows; i++) {
    v[i] = x.data[i * x.cols + j];
    norm2 += v[i] * v[i];
  }
  return { v, tau: 2 / (1 + norm2) };
}

/** M ← (I − τ v vᵀ) M. */
function applyReflector(m: Matrix, { v, tau }: { v: Float64Array; tau: number }): void {
  for (let c = 0; c < m.cols; c++) {
    let dot = 0;
    for (let i = 0; i < m.rows; i++) dot += v[i] * m.data[i * m.cols + c];
    const s = tau * dot;
    for (let i = 0; i < m.rows; i++) m.data[i * m.cols + c] -= s * v[i];
  }
}

/** torch keeps the sign in X's diagonal and applies it as `X.diagonal().int()` (truncation). */
function scaleColumnsBySignOfDiagonal(q: Matrix, x: Matrix): void {
  for (let j = 0; j < q.cols; j++) {
    const sign = Math.trunc(x.data[j * x.cols + j]);
    for (let i = 0; i < q.rows; i++) q.data[i * q.cols + j] *= sign;
  }
}

function multiply(a: Matrix, b: Matrix): Matrix {
  const out: Matrix = { rows: a.rows, cols: b.cols, data: new Float64Array(a.rows * b.cols) };
  for (let i = 0; i < a.rows; i++) {
    for (let p = 0; p < a.cols; p++) {
      const aip = a.data[i * a.cols + p];
      for (let j = 0; j < b.cols; j++) out.data[i * b.cols + j] += aip * b.data[p * b.cols + j];
    }
  }
  return out;
}

/** Xᵀ. */
export function transpose(m: Matrix): Matrix {
  const out: Matrix = { rows: m.cols, cols: m.rows, data: new Float64Array(m.data.length) };
  for (let i = 0; i < m.rows; i++) for (let j = 0; j < m.cols; j++) out.data[j * m.rows + i] = m.data[i * m.cols + j];
  return out;
}
