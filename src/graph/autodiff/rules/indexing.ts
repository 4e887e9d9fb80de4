import { axis } from '../shape.ts';
import type { OpRule } from '../types.ts';

/**
 * Gathers and scatters. Each gradient is the opposite move: a gather's gradient scatters `dy`
 * back (adding, since an index may repeat), a scatter's gradient gathers it.
 */

/** y = data[indices] along axis 0: d(data) = zeros with dy added at the gathered rows. */
export const Gather: OpRule = {
  shape: (n, q) => {
    const data = q.shape(n.inputs[0]);
    const a = axis(Number(n.attrs.axis ?? 0), data.length);
    return [...data.slice(0, a), ...q.shape(n.inputs[1]), ...data.slice(a + 1)];
  },
  backward: (b, n, dy, wants) => {
    if (!wants[0]) return [null, null];
    if (axis(Number(n.attrs.axis ?? 0), b.shape(n.inputs[0]).length) !== 0) throw new Error('Gather: gradient only along axis 0');
    const [data, indices] = n.inputs;
    const index = b.op('Unsqueeze', [indices, b.int64s([-1])]);
    return [b.op('ScatterND', [b.zerosLike(data), index, dy], { reduction: 'add' }), null];
  },
};

/**
 * y = data[indices] for indices [..., 1] (batch_dims 0), one index per output row: the same
 * gradient as Gather's, with the indices already in ScatterND's form (no int64 Unsqueeze, which
 * WebGPU cannot run).
 */
export const GatherND: OpRule = {
  shape: (n, q) => {
    const data = q.shape(n.inputs[0]);
    const indices = q.shape(n.inputs[1]);
    if (indices.at(-1) !== 1 || (n.attrs.batch_dims ?? 0) !== 0) throw new Error('GatherND: only [..., 1] indices, batch_dims 0');
    return [...indices.slice(0, -1), ...data.slice(1)];
  },
  backward: (b, n, dy, wants) => {
    if (!wants[0]) return [null, null];
    const [data, indices] = n.inputs;
    return [b.op('ScatterND', [b.zerosLike(data), indices, dy], { reduction: 'add' }), null];
  },
};

/** y[i][j] = data[i][indices[i][j]] (along `axis`): the same, with ScatterElements. */
export const GatherElements: OpRule = {
  shape: (n, q) => q.shape(n.inputs[1]),
  backward: (b, n, dy, wants) => {
    if (!wants[0]) return [null, null];
    const [data, indices] = n.inputs;
    return [b.op('ScatterElements', [b.zerosLike(data), indices, dy], { axis: Number(n.attrs.axis ?? 0), reduction: 'add' }), null];
  },
};

/**
 * y = data with y[indices] = updates (indices unique, as ONNX requires):
 *   d(data) = dy with the overwritten slots zeroed, d(updates) = dy[indices].
 */
export const ScatterND: OpRule = {
  shape: (n, q) => {
    if ((n.attrs.reduction ?? 'none') !== 'none') throw new Error('ScatterND: only reduction "none" is differentiable here');
    return q.shape(n.inputs[0]);
  },
  backward: (b, n, dy, wants) => {
    const [, indices, updates] = n.inputs;
    return [
      wants[0] ? b.op('ScatterND', [dy, indices, b.zerosLike(updates)]) : null,
      null,
      wants[2] ? b.op('GatherND', [dy, indices]) : null,
    ];
  },
};
