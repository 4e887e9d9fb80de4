import { axis, broadcast, reshape, type Dim } from '../shape.ts';
import type { Backward, OpRule, TapeNode } from '../types.ts';

/** Operators that only move elements: the gradient moves them back. */

/** Reshapes the gradient back to the input's runtime shape. */
const reshapeBack = (b: Backward, n: TapeNode, dy: string) => [b.op('Reshape', [dy, b.dynamicShape(n.inputs[0])]), null];

/** Target shape from a constant (0 copies, −1 infers); dynamic targets need an explicit shape. */
export const Reshape: OpRule = {
  shape: (n, q) => reshape(q.shape(n.inputs[0]), q.ints(n.inputs[1])),
  backward: reshapeBack,
};

export const Unsqueeze: OpRule = {
  shape: (n, q) => {
    const x = q.shape(n.inputs[0]);
    const rank = x.length + q.ints(n.inputs[1]).length;
    const axes = new Set(q.ints(n.inputs[1]).map((a) => axis(a, rank)));
    const out: Dim[] = [];
    let k = 0;
    for (let i = 0; i < rank; i++) out.push(axes.has(i) ? 1 : x[k++]);
    return out;
  },
  backward: reshapeBack,
};

export const Squeeze: OpRule = {
  shape: (n, q) => {
    const x = q.shape(n.inputs[0]);
    const axes = new Set(q.ints(n.inputs[1]).map((a) => axis(a, x.length)));
    return x.filter((_, i) => !axes.has(i));
  },
  backward: reshapeBack,
};

/** Transpose by `perm`; the gradient goes through the inverse permutation. */
export const Transpose: OpRule = {
  shape: (n, q) => {
    const x = q.shape(n.inputs[0]);
    const perm = (n.attrs.perm as number[] | undefined) ?? x.map((_, i) => x.length - 1 - i);
    return perm.map((p) => x[p]);
  },
  backward: (b, n, dy) => {
    const rank = b.shape(n.inputs[0]).length;
    const perm = (n.attrs.perm as number[] | undefined) ?? Array.from({ length: rank }, (_, i) => rank - 1 - i);
    const inverse = new Array<number>(rank);
    perm.forEach((p, i) => (inverse[p] = i));
    return [b.op('Transpose', [dy], { perm: inverse })];
  },
};

/** Broadcast to a constant shape: the gradient sums over the expanded axes. */
export const Expand: OpRule = {
  shape: (n, q) => broadcast(q.shape(n.inputs[0]), q.ints(n.inputs[1])),
  backward: (b, n, dy) => [b.unbroadcast(dy, b.shape(n.output), n.inputs[0]), null],
};
