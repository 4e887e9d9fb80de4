import { broadcast, type Dim } from '../shape.ts';
import type { Backward, OpRule } from '../types.ts';

/** Swaps the last two axes of a rank-`rank` value. */
function transposeLast(b: Backward, x: string, rank: number): string {
  const perm = Array.from({ length: rank }, (_, i) => i);
  [perm[rank - 2], perm[rank - 1]] = [perm[rank - 1], perm[rank - 2]];
  return b.op('Transpose', [x], { perm });
}

/**
 * Y = A·B over the last two axes, batch axes broadcast (ranks ≥ 2):
 *   dA = dY·Bᵀ, dB = Aᵀ·dY, each summed back over the batch axes it was broadcast along.
 */
export const MatMul: OpRule = {
  shape: (n, q) => {
    const a = q.shape(n.inputs[0]);
    const c = q.shape(n.inputs[1]);
    if (a.length < 2 || c.length < 2) throw new Error('MatMul: rank-1 operands are not supported');
    if (a.at(-1) !== c.at(-2)) throw new Error(`MatMul: inner dims differ ([${a}] x [${c}])`);
    return [...broadcast(a.slice(0, -2), c.slice(0, -2)), a.at(-2) as Dim, c.at(-1) as Dim];
  },
  backward: (b, n, dy, wants) => {
    const [x, w] = n.inputs;
    const rank = b.shape(n.output).length;
    const out = b.shape(n.output);
    const da = wants[0] ? b.op('MatMul', [dy, transposeLast(b, w, b.shape(w).length)]) : null;
    const db = wants[1] ? b.op('MatMul', [transposeLast(b, x, b.shape(x).length), dy]) : null;
    const shapeDa = [...out.slice(0, -1), b.shape(x).at(-1) as Dim];
    const shapeDb = [...out.slice(0, -2), b.shape(w).at(-2) as Dim, out[rank - 1]];
    return [da && b.unbroadcast(da, shapeDa, x), db && b.unbroadcast(db, shapeDb, w)];
  },
};

/**
 * Y = op(A)·op(B) + C for 2-D A, B (alpha = beta = 1), op = optional transpose. Linear layers
 * use it with transB = 1 so the frozen [out, in] weights are read as stored:
 *   dA = dY·op(B)ᵀ (transposed back if transA), dB = op(A)ᵀ·dY (likewise), dC = ΣdY.
 */
export const Gemm: OpRule = {
  shape: (n, q) => {
    const a = q.shape(n.inputs[0]);
    const c = q.shape(n.inputs[1]);
    const ta = n.attrs.transA === 1;
    const tb = n.attrs.transB === 1;
    if ((n.attrs.alpha ?? 1) !== 1 || (n.attrs.beta ?? 1) !== 1) throw new Error('Gemm: only alpha = beta = 1');
    const inner = [ta ? a[0] : a[1], tb ? c[1] : c[0]];
    if (inner[0] !== inner[1]) throw new Error(`Gemm: inner dims differ ([${a}] x [${c}])`);
    return [ta ? a[1] : a[0], tb ? c[0] : c[1]];
  },
  backward: (b, n, dy, wants) => {
    const [a, w, c] = n.inputs;
    const ta = n.attrs.transA === 1;
    const tb = n.attrs.transB === 1;
    // dA (as stored): ta ? op(B)·dYᵀ : dY·op(B)ᵀ
    const da = !wants[0]
      ? null
      : ta
        ? b.op('Gemm', [w, dy], { transA: tb ? 1 : 0, transB: 1 })
        : b.op('Gemm', [dy, w], { transB: tb ? 0 : 1 });
    // dB (as stored): tb ? dYᵀ·op(A) : op(A)ᵀ·dY
    const db = !wants[1]
      ? null
      : tb
        ? b.op('Gemm', [dy, a], { transA: 1, transB: ta ? 1 : 0 })
        : b.op('Gemm', [a, dy], { transA: ta ? 0 : 1 });
    const dc = c !== undefined && wants[2] ? b.unbroadcast(dy, b.shape(n.output), c) : null;
    return [da, db, dc];
  },
};
