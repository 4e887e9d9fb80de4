import { tmpdir } from 'node:os';
import * as ort from 'onnxruntime-node';
import { describe, expect, it } from 'vitest';
import { createSession } from '../src/runtime/session.ts';
import { Tape } from '../src/graph/autodiff/index.ts';
import { GraphBuilder } from '../src/graph/onnx.ts';
import { trainingOperators } from '../src/graph/training-operators.ts';
import { Rng } from '../src/rng.ts';

/**
 * Each gradient rule on a tiny graph: loss = Σ op(inputs) ⊙ probe (a fixed random weight, so
 * every output element matters differently), gradients from the tape against central
 * differences of the same float32 graph's loss.
 */
interface Arg {
  shape: number[];
  /** Values (default: uniform in [-1, 1]); `positive` keeps them in [0.5, 1.5]. */
  data?: number[];
  positive?: boolean;
  /** Not differentiated (indices-like floats, exponents). */
  frozen?: boolean;
}

const rng = new Rng(7);
const size = (s: number[]) => s.reduce((a, b) => a * b, 1);

async function checkRule(
  args: Arg[],
  build: (t: Tape, x: string[]) => string,
  operators = trainingOperators('cpu'),
): Promise<{ err: number; n: number }> {
  const g = new GraphBuilder('rule_test');
  const t = new Tape(g, operators);
  const names = args.map((a, i) => t.input(`x${i}`, 'float32', a.shape));
  const y = build(t, names);
  const yShape = t.shape(y).map(Number);
  const probe = t.constant(
    'probe',
    Float32Array.from({ length: size(yShape) }, () => rng.uniform(-1, 1)),
    yShape,
  );
  const loss = t.op('ReduceSum', [t.op('Mul', [y, probe])], { keepdims: 0 });
  const wrt = names.filter((_, i) => !args[i].frozen);
  const grads = t.gradients(loss, wrt);
  g.output(loss, 'loss', 'float32', []);
  grads.forEach((gr, i) => g.output(gr, `grad_${i}`, 'float32', args.filter((a) => !a.frozen)[i].shape));
  const session = await createSession(g.encode({ '': 21 }), tmpdir(), { threads: 1 });

  const values = args.map((a) =>
    Float64Array.from(a.data ?? Array.from({ length: size(a.shape) }, () => (a.positive ? rng.uniform(0.5, 1.5) : rng.uniform(-1, 1)))),
  );
  const feeds = () => Object.fromEntries(args.map((a, i) => [`x${i}`, new ort.Tensor('float32', Float32Array.from(values[i]), a.shape)]));
  const out = await session.run(feeds());
  let num = 0;
  let den = 0;
  let n = 0;
  const eps = 1e-2;
  let gi = 0;
  for (let i = 0; i < args.length; i++) {
    if (args[i].frozen) continue;
    const analytic = out[`grad_${gi++}`].data as Float32Array;
    expect(analytic.length).toBe(values[i].length);
    for (let k = 0; k < values[i].length; k++) {
      const x0 = values[i][k];
      values[i][k] = x0 + eps;
      const plus = ((await session.run(feeds(), ['loss'])).loss.data as Float32Array)[0];
      values[i][k] = x0 - eps;
      const minus = ((await session.run(feeds(), ['loss'])).loss.data as Float32Array)[0];
      values[i][k] = x0;
      const fd = (plus - minus) / (2 * eps);
      num += (analytic[k] - fd) ** 2;
      den += fd ** 2;
      n++;
    }
  }
  await session.release();
  return { err: Math.sqrt(num / Math.max(den, 1e-12)), n };
}

/** Relative error bound: float32 central differences with eps 1e-2 on O(1) values. */
const TOL = 2e-3;

const cases: Array<[string, Arg[], (t: Tape, x: string[]) => string]> = [
  ['Add (broadcast rank and size-1 axes)', [{ shape: [2, 1, 3] }, { shape: [4, 1] }], (t, [a, b]) => t.op('Add', [a, b])],
  ['Sub (broadcast)', [{ shape: [2, 3] }, { shape: [3] }], (t, [a, b]) => t.op('Sub', [a, b])],
  ['Mul (broadcast)', [{ shape: [3, 2] }, { shape: [3, 1] }], (t, [a, b]) => t.op('Mul', [a, b])],
  ['Mul (same input twice)', [{ shape: [5] }], (t, [a]) => t.op('Mul', [a, a])],
  ['Div', [{ shape: [2, 3] }, { shape: [1, 3], positive: true }], (t, [a, b]) => t.op('Div', [a, b])],
  ['Pow (constant exponent)', [{ shape: [4], positive: true }], (t, [a]) => t.op('Pow', [a, t.scalar('p', 3)])],
  ['Neg', [{ shape: [4] }], (t, [a]) => t.op('Neg', [a])],
  ['Identity', [{ shape: [4] }], (t, [a]) => t.op('Identity', [a])],
  ['Sqrt', [{ shape: [4], positive: true }], (t, [a]) => t.op('Sqrt', [a])],
  ['Reciprocal', [{ shape: [4], positive: true }], (t, [a]) => t.op('Reciprocal', [a])],
  ['Sigmoid', [{ shape: [6] }], (t, [a]) => t.op('Sigmoid', [a])],
  ['Exp', [{ shape: [6] }], (t, [a]) => t.op('Exp', [a])],
  ['Log', [{ shape: [4], positive: true }], (t, [a]) => t.op('Log', [a])],
  ['Tanh', [{ shape: [6] }], (t, [a]) => t.op('Tanh', [a])],
  [
    'Where (broadcast branches)',
    [{ shape: [2, 3] }, { shape: [3] }],
    (t, [a, b]) => {
      const cond = t.declare(
        t.g.op('Greater', [t.constant('c', Float32Array.of(1, -1, 1, -1, -1, 1), [2, 3]), t.scalar('zero', 0)]),
        [2, 3],
      );
      return t.op('Where', [cond, a, b]);
    },
  ],
  ['MatMul 2-D', [{ shape: [2, 3] }, { shape: [3, 4] }], (t, [a, b]) => t.op('MatMul', [a, b])],
  ['MatMul batched, both broadcast', [{ shape: [2, 1, 3, 4] }, { shape: [1, 3, 4, 2] }], (t, [a, b]) => t.op('MatMul', [a, b])],
  ['MatMul 3-D by 2-D', [{ shape: [2, 3, 4] }, { shape: [4, 2] }], (t, [a, b]) => t.op('MatMul', [a, b])],
  ['Gemm', [{ shape: [2, 3] }, { shape: [3, 4] }, { shape: [4] }], (t, [a, b, c]) => t.op('Gemm', [a, b, c])],
  ['Gemm transB', [{ shape: [2, 3] }, { shape: [4, 3] }], (t, [a, b]) => t.op('Gemm', [a, b], { transB: 1 })],
  ['Gemm transA', [{ shape: [3, 2] }, { shape: [3, 4] }], (t, [a, b]) => t.op('Gemm', [a, b], { transA: 1 })],
  [
    'Gemm transA transB',
    [{ shape: [3, 2] }, { shape: [4, 3] }, { shape: [2, 1] }],
    (t, [a, b, c]) => t.op('Gemm', [a, b, c], { transA: 1, transB: 1 }),
  ],
  ['Reshape (0 and -1)', [{ shape: [2, 3, 2] }], (t, [a]) => t.op('Reshape', [a, t.int64s('s', [0, -1])])],
  ['Unsqueeze', [{ shape: [2, 3] }], (t, [a]) => t.op('Unsqueeze', [a, t.int64s('ax', [0, -1])])],
  ['Squeeze', [{ shape: [2, 1, 3] }], (t, [a]) => t.op('Squeeze', [a, t.int64s('ax', [1])])],
  ['Transpose', [{ shape: [2, 3, 4] }], (t, [a]) => t.op('Transpose', [a], { perm: [2, 0, 1] })],
  ['Expand', [{ shape: [3, 1] }], (t, [a]) => t.op('Expand', [a, t.int64s('s', [2, 3, 4])])],
  ['Gather axis 0 (repeated indices)', [{ shape: [4, 3] }], (t, [a]) => t.op('Gather', [a, t.int64s('i', [2, 0, 2])], { axis: 0 })],
  [
    'GatherND rows (repeated indices)',
    [{ shape: [4, 3] }],
    (t, [a]) => t.op('GatherND', [a, t.constant('i', BigInt64Array.of(2n, 0n, 2n), [3, 1])]),
  ],
  [
    'GatherElements along the last axis (repeats)',
    [{ shape: [2, 5] }],
    (t, [a]) => t.op('GatherElements', [a, t.constant('i', BigInt64Array.of(1n, 1n, 4n, 0n), [2, 2])], { axis: -1 }),
  ],
  [
    'ScatterND (rows)',
    [{ shape: [4, 3] }, { shape: [2, 3] }],
    (t, [a, u]) => t.op('ScatterND', [a, t.constant('i', BigInt64Array.of(3n, 1n), [2, 1]), u]),
  ],
  ['ReduceSum keepdims', [{ shape: [2, 3, 2] }], (t, [a]) => t.op('ReduceSum', [a, t.int64s('ax', [1])], { keepdims: 1 })],
  ['ReduceSum dropping axes', [{ shape: [2, 3, 2] }], (t, [a]) => t.op('ReduceSum', [a, t.int64s('ax', [0, 2])], { keepdims: 0 })],
  ['ReduceMean', [{ shape: [2, 4] }], (t, [a]) => t.op('ReduceMean', [a, t.int64s('ax', [-1])], { keepdims: 1 })],
  ['Softmax', [{ shape: [2, 5] }], (t, [a]) => t.op('Softmax', [a], { axis: -1 })],
  ['LogSoftmax', [{ shape: [3, 4] }], (t, [a]) => t.op('LogSoftmax', [a], { axis: -1 })],
];

describe('autodiff: each gradient rule against finite differences', () => {
  for (const [name, args, build] of cases) {
    it(name, async () => {
      const { err, n } = await checkRule(args, build);
      expect(n).toBeGreaterThan(0);
      expect(err).toBeLessThan(TOL);
    });
  }

  // WebGPU's choices (training-operators.ts) are standard ONNX too: their rules run on the CPU here
  const webgpu = trainingOperators('webgpu');
  it("WebGPU operators: zeros by Expand (the gathers' gradients)", async () => {
    const { err } = await checkRule(
      [{ shape: [4, 3] }],
      (t, [a]) =>
        t.op('GatherND', [t.op('Gather', [a, t.int64s('i', [1, 1, 3])], { axis: 0 }), t.constant('j', BigInt64Array.of(2n, 0n), [2, 1])]),
      webgpu,
    );
    expect(err).toBeLessThan(TOL);
  });

  it('WebGPU operators: ReduceMean over symbolic axes counts elements from the shape', async () => {
    const { err } = await checkRule(
      [{ shape: [2, 3] }],
      (t, [a]) => {
        // a reshape the tape cannot see through: the reduced axis is symbolic
        const x = t.op('Reshape', [a, t.g.op('Shape', [a])], {}, { shape: ['rows', 'cols'] });
        const mean = t.op('ReduceMean', [t.op('Mul', [x, x]), t.int64s('ax', [-1])], { keepdims: 1 });
        return t.op('Reshape', [mean, t.int64s('s', [2, 1])]);
      },
      webgpu,
    );
    expect(err).toBeLessThan(TOL);
  });

  it('a chain with shared values (RMSNorm-like) matches finite differences', async () => {
    const { err } = await checkRule([{ shape: [3, 4] }, { shape: [4] }], (t, [x, w]) => {
      const ms = t.op('ReduceMean', [t.op('Mul', [x, x]), t.int64s('ax', [-1])], { keepdims: 1 });
      const inv = t.op('Reciprocal', [t.op('Sqrt', [t.op('Add', [ms, t.scalar('eps', 1e-5)])])]);
      return t.op('Mul', [t.op('Mul', [x, inv]), w]);
    });
    expect(err).toBeLessThan(TOL);
  });

  it('inputs the output does not depend on get zero gradients; frozen paths get no backward nodes', async () => {
    const g = new GraphBuilder('unused');
    const t = new Tape(g);
    const a = t.input('a', 'float32', [3]);
    const b = t.input('b', 'float32', [3]);
    const frozen = t.op('Sigmoid', [b]);
    const loss = t.op('ReduceSum', [t.op('Mul', [a, frozen])], { keepdims: 0 });
    const before = (g as unknown as { nodes: unknown[] }).nodes.length;
    const [, gb] = t.gradients(loss, [a, t.input('c', 'float32', [2])]);
    const added = (g as unknown as { nodes: Array<{ opType: string }> }).nodes.slice(before).map((n) => n.opType);
    expect(added).not.toContain('Sub'); // Sigmoid's rule was not used: b is not differentiated
    g.output(gb, 'gc', 'float32', [2]);
    const s = await createSession(g.encode({ '': 21 }), tmpdir(), { threads: 1 });
    const out = await s.run({
      a: new ort.Tensor('float32', new Float32Array(3), [3]),
      b: new ort.Tensor('float32', new Float32Array(3), [3]),
      c: new ort.Tensor('float32', new Float32Array(2), [2]),
    });
    expect([...(out.gc.data as Float32Array)]).toEqual([0, 0]);
  });
});
