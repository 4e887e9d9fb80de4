import { axis, product, type Dim } from '../shape.ts';
import type { Backward, OpRule, ShapeQuery, TapeNode } from '../types.ts';

/** Reductions and the (log-)softmax, all along constant axes. */

function reducedAxes(n: TapeNode, q: ShapeQuery): number[] {
  const rank = q.shape(n.inputs[0]).length;
  // no axes input means every axis (noop_with_empty_axes is not used)
  return n.inputs[1] ? q.ints(n.inputs[1]).map((a) => axis(a, rank)) : Array.from({ length: rank }, (_, i) => i);
}

const reduceShape: OpRule['shape'] = (n, q) => {
  const axes = new Set(reducedAxes(n, q));
  const keep = n.attrs.keepdims !== 0;
  const out: Dim[] = [];
  q.shape(n.inputs[0]).forEach((d, i) => {
    if (!axes.has(i)) out.push(d);
    else if (keep) out.push(1);
  });
  return out;
};

/** dy spread back over the reduced axes: re-insert them (if dropped), then expand to x. */
function spread(b: Backward, n: TapeNode, dy: string): string {
  const kept = n.attrs.keepdims !== 0 ? dy : b.op('Unsqueeze', [dy, b.int64s(reducedAxes(n, b))]);
  return b.op('Expand', [kept, b.dynamicShape(n.inputs[0])]);
}

export const ReduceSum: OpRule = {
  shape: reduceShape,
  backward: (b, n, dy) => [spread(b, n, dy), null],
};

/** The mean's gradient is the sum's divided by the count (static when the dims are numbers). */
export const ReduceMean: OpRule = {
  shape: reduceShape,
  backward: (b, n, dy) => {
    const x = b.shape(n.inputs[0]);
    const count = product(reducedAxes(n, b).map((a) => x[a]));
    const scale = typeof count === 'number' ? b.scalar(1 / count) : b.op('Div', [b.elementCount(n.output), b.elementCount(n.inputs[0])]);
    return [b.op('Mul', [spread(b, n, dy), scale]), null];
  },
};

const softmaxAxis = (n: TapeNode): number => Number(n.attrs.axis ?? -1);

/** y = softmax(x): dx = y·(dy − Σ dy·y) along the axis. */
export const Softmax: OpRule = {
  shape: (n, q) => q.shape(n.inputs[0]),
  backward: (b, n, dy) => {
    const y = n.output;
    const dot = b.op('ReduceSum', [b.op('Mul', [dy, y]), b.int64s([softmaxAxis(n)])], { keepdims: 1 });
    return [b.op('Mul', [y, b.op('Sub', [dy, dot])])];
  },
};

/** y = log softmax(x): dx = dy − exp(y)·Σ dy along the axis. */
export const LogSoftmax: OpRule = {
  shape: (n, q) => q.shape(n.inputs[0]),
  backward: (b, n, dy) => {
    const total = b.op('ReduceSum', [dy, b.int64s([softmaxAxis(n)])], { keepdims: 1 });
    return [b.op('Sub', [dy, b.op('Mul', [b.op('Exp', [n.output]), total])])];
  },
};
