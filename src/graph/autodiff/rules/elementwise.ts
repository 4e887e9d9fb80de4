import { broadcast } from '../shape.ts';
import type { Backward, OpRule, TapeNode } from '../types.ts';

/**
 * Elementwise operators. Binary ones broadcast, so each input's gradient is summed back to
 * its own shape (`unbroadcast`). y is the node's output, x its (first) input.
 */
const binaryShape: OpRule['shape'] = (n, q) => broadcast(q.shape(n.inputs[0]), q.shape(n.inputs[1]));
const unaryShape: OpRule['shape'] = (n, q) => q.shape(n.inputs[0]);

/** Gradients for both inputs of a binary op from per-input local products (before unbroadcast). */
function binary(b: Backward, n: TapeNode, wants: readonly boolean[], da: () => string, db: () => string): Array<string | null> {
  const out = b.shape(n.output);
  return [wants[0] ? b.unbroadcast(da(), out, n.inputs[0]) : null, wants[1] ? b.unbroadcast(db(), out, n.inputs[1]) : null];
}

export const Add: OpRule = {
  shape: binaryShape,
  backward: (b, n, dy, wants) =>
    binary(
      b,
      n,
      wants,
      () => dy,
      () => dy,
    ),
};

export const Sub: OpRule = {
  shape: binaryShape,
  backward: (b, n, dy, wants) =>
    binary(
      b,
      n,
      wants,
      () => dy,
      () => b.op('Neg', [dy]),
    ),
};

/** d(a·b) = b·dy, a·dy */
export const Mul: OpRule = {
  shape: binaryShape,
  backward: (b, n, dy, wants) => {
    const [x, y] = n.inputs;
    return binary(
      b,
      n,
      wants,
      () => b.op('Mul', [dy, y]),
      () => b.op('Mul', [dy, x]),
    );
  },
};

/** y = a/b: da = dy/b, db = −dy·y/b */
export const Div: OpRule = {
  shape: binaryShape,
  backward: (b, n, dy, wants) => {
    const den = n.inputs[1];
    return binary(
      b,
      n,
      wants,
      () => b.op('Div', [dy, den]),
      () => b.op('Neg', [b.op('Div', [b.op('Mul', [dy, n.output]), den])]),
    );
  },
};

/** y = x^p for a constant p: dx = dy·p·x^(p−1). The exponent gets no gradient. */
export const Pow: OpRule = {
  shape: binaryShape,
  backward: (b, n, dy, wants) => {
    if (wants[1]) throw new Error('Pow: the exponent must be a constant');
    const [x, p] = n.inputs;
    const local = b.op('Mul', [p, b.op('Pow', [x, b.op('Sub', [p, b.scalar(1)])])]);
    return [b.unbroadcast(b.op('Mul', [dy, local]), b.shape(n.output), x), null];
  },
};

export const Neg: OpRule = {
  shape: unaryShape,
  backward: (b, _n, dy) => [b.op('Neg', [dy])],
};

export const Identity: OpRule = {
  shape: unaryShape,
  backward: (_b, _n, dy) => [dy],
};

/** y = √x: dx = dy / (2y) */
export const Sqrt: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Div', [b.op('Mul', [dy, b.scalar(0.5)]), n.output])],
};

/** y = 1/x: dx = −dy·y² */
export const Reciprocal: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Neg', [b.op('Mul', [dy, b.op('Mul', [n.output, n.output])])])],
};

/** y = eˣ: dx = dy·y */
export const Exp: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Mul', [dy, n.output])],
};

/** y = ln x: dx = dy / x */
export const Log: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Div', [dy, n.inputs[0]])],
};

/** y = σ(x): dx = dy·y·(1 − y) */
export const Sigmoid: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Mul', [dy, b.op('Mul', [n.output, b.op('Sub', [b.scalar(1), n.output])])])],
};

/** y = tanh(x): dx = dy·(1 − y²) */
export const Tanh: OpRule = {
  shape: unaryShape,
  backward: (b, n, dy) => [b.op('Mul', [dy, b.op('Sub', [b.scalar(1), b.op('Mul', [n.output, n.output])])])],
};

/** y = cond ? a : b — the condition is not differentiable. */
export const Where: OpRule = {
  shape: (n, q) => broadcast(broadcast(q.shape(n.inputs[0]), q.shape(n.inputs[1])), q.shape(n.inputs[2])),
  backward: (b, n, dy, wants) => {
    const [cond, x, y] = n.inputs;
    const out = b.shape(n.output);
    const zero = b.scalar(0);
    return [
      null,
      wants[1] ? b.unbroadcast(b.op('Where', [cond, dy, zero]), out, x) : null,
      wants[2] ? b.unbroadcast(b.op('Where', [cond, zero, dy]), out, y) : null,
    ];
  },
};
