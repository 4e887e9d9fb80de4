import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildTrainingGraph } from '../src/graph/training-graph.ts';
import type { InterventionSpec } from '../src/interventions/artifact.ts';
import { parsePositions } from '../src/interventions/positions.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { StackLayout, allocateFactors, packBatch, type TrainingExample } from '../src/training/batch.ts';
import { initialTensors, kindGradients, writeLowRank, type KindTensors } from '../src/training/kinds.ts';
import { Rng } from '../src/rng.ts';
import { accumulateGradients } from '../src/training/accumulate.ts';
import { planMicroBatches, stepBytes } from '../src/training/memory.ts';
import { StepSession, type TrainingBatch } from '../src/training/step-session.ts';
import { STORIES, fixtureCase, reference, tensor } from './support/fixtures.ts';

const { onnx } = onnxProto as unknown as { onnx: typeof OnnxTypes };
const D = 64;
let model: LoadedModel;
const graphs: StepSession[] = [];

beforeAll(async () => {
  model = await loadModel(STORIES);
});
afterAll(async () => {
  for (const g of graphs) await g.release();
});

async function graphFor(layers: number[]): Promise<StepSession> {
  const g = await StepSession.create(model.config, model.checkpoint, layers, { threads: 1 });
  graphs.push(g);
  return g;
}

const spec = (kind: InterventionSpec['kind'], layer: number, rank: number, positions: string): InterventionSpec => ({
  kind,
  layer,
  rank,
  positions: parsePositions(positions),
});

/** ‖a − b‖ / ‖b‖ */
function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

/** A set of interventions with their kind tensors, evaluated through a training graph. */
class Problem {
  readonly layout: StackLayout;
  readonly factors;
  batch!: TrainingBatch;

  constructor(
    readonly graph: StepSession,
    readonly specs: InterventionSpec[],
    readonly params: KindTensors[],
  ) {
    this.layout = new StackLayout(specs);
    this.factors = allocateFactors(this.layout, D);
    this.write();
  }

  /** Folds the kind tensors into the stacked factors the batch feeds (shared arrays). */
  write(): void {
    this.specs.forEach((s, i) => writeLowRank(s.kind, this.params[i], s.rank, D, this.layout.slotOf(i).offset, this.factors.get(s.layer)!));
  }

  pack(examples: TrainingExample[], dropout?: { p: number; rng: Rng }): this {
    this.batch = packBatch(examples, this.layout, this.factors, D, dropout);
    return this;
  }

  async gradients(): Promise<{ loss: number; grads: KindTensors[] }> {
    const res = await this.graph.run(this.batch);
    const grads = this.specs.map((s, i) => kindGradients(s.kind, s.rank, D, this.layout.slotOf(i).offset, res.grads.get(s.layer)!));
    return { loss: res.loss, grads };
  }

  /** The loss at params + eps·direction (direction given per intervention and tensor). */
  async lossAlong(direction: KindTensors[], eps: number): Promise<number> {
    const saved = this.params.map((t) => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.slice()])));
    this.params.forEach((t, i) => {
      for (const [k, v] of Object.entries(t)) {
        const dir = direction[i][k];
        if (dir) for (let j = 0; j < v.length; j++) v[j] += eps * dir[j];
      }
    });
    this.write();
    const loss = await this.graph.loss(this.batch);
    this.params.forEach((t, i) => Object.entries(saved[i]).forEach(([k, v]) => t[k].set(v)));
    this.write();
    return loss;
  }
}

const dot = (a: KindTensors[], b: KindTensors[]) =>
  a.reduce((s, t, i) => s + Object.keys(t).reduce((s2, k) => s2 + (b[i][k] ? t[k].reduce((s3, x, j) => s3 + x * b[i][k][j], 0) : 0), 0), 0);
const scale = (a: KindTensors[], c: number): KindTensors[] =>
  a.map((t) => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.map((x) => x * c)])));

/** The reference gradient case: its interventions at the fixture's tensors, and its one row. */
async function gradFixture(): Promise<{ p: Problem; row: TrainingExample; specs: InterventionSpec[] }> {
  const raw = reference.cases.find((c) => c.name === 'grad')!;
  const c = fixtureCase(raw);
  const specs = raw.interventions.map((iv) => spec(iv.kind, iv.layer, iv.rank, iv.positions));
  const params = specs.map((_, i) => {
    const t: KindTensors = {};
    for (const [k, v] of Object.entries(c.tensors)) if (k.startsWith(`iv${i}.`)) t[k.slice(`iv${i}.`.length)] = v.slice();
    return t;
  });
  expect(c.prompt.length).toBe(raw.prompt_len + raw.completion_len!);
  const p = new Problem(await graphFor(specs.map((s) => s.layer)), specs, params);
  return { p, row: { tokens: c.prompt, promptLength: raw.prompt_len }, specs };
}

describe('training graph: the reference gradient case', () => {
  it('loss and every gradient within 1e-4 relative of the PyTorch reference', async () => {
    const { p, row, specs } = await gradFixture();
    const { loss, grads } = await p.pack([row]).gradients();
    const refLoss = tensor('grad.loss')[0];
    expect(Math.abs(loss - refLoss) / Math.abs(refLoss)).toBeLessThan(1e-4);
    let checked = 0;
    specs.forEach((_, i) => {
      for (const [name, g] of Object.entries(grads[i])) {
        const err = relativeError(g, tensor(`grad.iv${i}.${name}.grad`));
        expect(err, `iv${i}.${name}`).toBeLessThan(1e-4);
        checked++;
      }
    });
    expect(checked).toBe(9);
  });
});

/**
 * Issue 11's done-when: micro-batched training equals unsplit training within 1e-5 on the
 * gradient fixture. The trainer's own accumulation (accumulateGradients) over the passes the
 * memory plan makes, against one pass over the whole batch, at the fixture's tensors.
 */
describe('training graph: micro-batches on the reference gradient case', () => {
  const zeros = (like: KindTensors[]) =>
    like.map((t) => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, new Float32Array(v.length)])));

  it('a batch split by the memory plan gives the unsplit loss and gradients within 1e-5', async () => {
    const { p, row, specs } = await gradFixture();
    const step = { graph: p.graph, specs, layout: p.layout, factors: p.factors, hiddenSize: D };
    // rows of different lengths and completion counts, so the passes' token weights differ
    const rows: TrainingExample[] = [
      row,
      { tokens: row.tokens.slice(0, row.promptLength + 3), promptLength: row.promptLength },
      { tokens: row.tokens.slice(5), promptLength: row.promptLength - 5 },
      { tokens: row.tokens, promptLength: row.promptLength - 3 },
    ];
    const whole = zeros(p.params);
    const unsplit = await accumulateGradients(step, [rows], whole);
    const longest = row.tokens.length;
    for (const [rowsPerPass, expected] of [
      [1, [[0], [1], [2], [3]]],
      [
        2,
        [
          [0, 1],
          [2, 3],
        ],
      ],
    ] as const) {
      const plan = planMicroBatches(
        model.config,
        [0, 1, 2, 3],
        (i) => rows[i].tokens.length,
        stepBytes(model.config, rowsPerPass, longest),
      );
      expect(plan).toEqual(expected);
      const split = zeros(p.params);
      const micro = await accumulateGradients(
        step,
        plan.map((idx) => idx.map((i) => rows[i])),
        split,
      );
      expect(Math.abs(micro.loss - unsplit.loss)).toBeLessThan(1e-5);
      expect(micro.tokens).toBe(unsplit.tokens);
      let checked = 0;
      specs.forEach((_, i) => {
        for (const [name, g] of Object.entries(whole[i])) {
          const worst = g.reduce((m, x, k) => Math.max(m, Math.abs(x - split[i][name][k])), 0);
          expect(worst, `iv${i}.${name}, ${rowsPerPass} row(s) a pass`).toBeLessThan(1e-5);
          expect(g.some((x) => x !== 0)).toBe(true);
          checked++;
        }
      });
      expect(checked).toBe(9);
    }
  });

  it('the fixture row three times, one pass each, accumulates to the PyTorch reference gradient', async () => {
    const { p, row, specs } = await gradFixture();
    const step = { graph: p.graph, specs, layout: p.layout, factors: p.factors, hiddenSize: D };
    const grads = zeros(p.params);
    const { loss } = await accumulateGradients(step, [[row], [row], [row]], grads);
    const refLoss = tensor('grad.loss')[0];
    expect(Math.abs(loss - refLoss) / Math.abs(refLoss)).toBeLessThan(1e-4);
    specs.forEach((_, i) => {
      for (const [name, g] of Object.entries(grads[i]))
        expect(relativeError(g, tensor(`grad.iv${i}.${name}.grad`)), `iv${i}.${name}`).toBeLessThan(1e-4);
    });
  });
});

const FD_TOLERANCE = 1e-3;

/**
 * Central differences of the float32 graph's loss, taken in float64 along unit directions:
 * the gradient's own direction, random ones, and each tensor's gradient direction alone
 * (which isolates that tensor's mapping from the low-rank form). Returns the worst error as a
 * fraction of what is allowed: 1e-3 of the direction's reference norm, plus the noise floor
 * of differencing a float32 loss (a few ulps of the loss over 2·eps; ~2e-4 at loss ≈ 15),
 * which dominates only for tensors with tiny gradients (a bias).
 */
async function finiteDifferenceCheck(p: Problem, rng: Rng): Promise<{ worst: number; worstRelative: number }> {
  const eps = 1e-2;
  const { loss, grads } = await p.gradients();
  const norm = Math.sqrt(dot(grads, grads));
  expect(norm).toBeGreaterThan(1e-3);
  const directions: Array<{ v: KindTensors[]; ref: number }> = [];
  directions.push({ v: scale(grads, 1 / norm), ref: norm });
  for (let k = 0; k < 3; k++) {
    const v = grads.map((t) => Object.fromEntries(Object.entries(t).map(([name, x]) => [name, x.map(() => rng.normal())])));
    directions.push({ v: scale(v, 1 / Math.sqrt(dot(v, v))), ref: norm });
  }
  grads.forEach((t, i) => {
    for (const [name, g] of Object.entries(t)) {
      const n = Math.hypot(...g);
      if (n === 0) continue;
      const v = grads.map(() => ({}) as KindTensors);
      v[i][name] = g.map((x) => x / n);
      directions.push({ v, ref: n });
    }
  });
  const ulp = 2 ** (Math.floor(Math.log2(Math.abs(loss))) - 23);
  const floor = (8 * ulp) / (2 * eps);
  let worst = 0;
  let worstRelative = 0;
  for (const { v, ref } of directions) {
    const fd = ((await p.lossAlong(v, eps)) - (await p.lossAlong(v, -eps))) / (2 * eps);
    const err = Math.abs(fd - dot(grads, v));
    worst = Math.max(worst, err / (FD_TOLERANCE * ref + floor));
    worstRelative = Math.max(worstRelative, err / ref);
  }
  if (process.env.REFT_REPORT)
    console.log(`finite differences: worst ${worst.toFixed(3)} of allowed, worst |fd − g·v| / ref ${worstRelative.toExponential(2)}`);
  return { worst, worstRelative };
}

function randomExamples(rng: Rng, shapes: Array<[number, number]>): TrainingExample[] {
  return shapes.map(([n, prompt]) => ({
    tokens: [1, ...Array.from({ length: n - 1 }, () => 3 + Math.floor(rng.next() * 500))],
    promptLength: prompt,
  }));
}

describe('training graph: gradients against finite differences', () => {
  it('loreft on the first and last layers, split f2 / l2 on one layer, batch 3 with padding and dropout', async () => {
    const rng = new Rng(11);
    const specs = [spec('loreft', 0, 4, 'f2+l2'), spec('loreft', 4, 3, 'f2'), spec('loreft', 4, 3, 'l2')];
    const p = new Problem(
      await graphFor([0, 4]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    p.pack(
      randomExamples(rng, [
        [12, 6],
        [7, 4],
        [15, 9],
      ]),
      { p: 0.2, rng },
    );
    expect((await finiteDifferenceCheck(p, rng)).worst).toBeLessThan(1);
  });

  it('direft on layers 2 and 4, batch 2', async () => {
    const rng = new Rng(12);
    const specs = [spec('direft', 2, 4, 'f1+l1'), spec('direft', 4, 2, 'l3')];
    const p = new Problem(
      await graphFor([2, 4]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    p.pack(
      randomExamples(rng, [
        [9, 5],
        [14, 8],
      ]),
    );
    expect((await finiteDifferenceCheck(p, rng)).worst).toBeLessThan(1);
  });

  it('noreft, consreft and lobireft through the low-rank mapping, two kinds sharing positions on one layer', async () => {
    const rng = new Rng(13);
    const specs = [
      spec('noreft', 1, 2, 'f1+l1'),
      spec('consreft', 3, 2, 'f3'),
      spec('lobireft', 3, 1, 'f2+l2'),
      spec('loreft', 2, 2, 'l1'),
    ];
    const p = new Problem(
      await graphFor([1, 2, 3]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    p.pack(
      randomExamples(rng, [
        [10, 7],
        [16, 6],
        [8, 8],
      ]),
      { p: 0.1, rng },
    );
    expect((await finiteDifferenceCheck(p, rng)).worst).toBeLessThan(1);
  });
});

describe('training graph: batching', () => {
  it('a padded batch gives the token-weighted mean of its rows run alone (padding is ignored)', async () => {
    const rng = new Rng(21);
    const specs = [spec('loreft', 1, 2, 'f3+l3'), spec('direft', 3, 2, 'l2')];
    const params = specs.map((s) => initialTensors(s.kind, s.rank, D, rng));
    const p = new Problem(await graphFor([1, 3]), specs, params);
    const examples = randomExamples(rng, [
      [13, 5],
      [6, 3],
      [18, 10],
    ]);
    const together = await p.pack(examples).gradients();
    let loss = 0;
    const sum = specs.map(() => ({}) as KindTensors);
    let tokens = 0;
    for (const e of examples) {
      const n = e.tokens.length - e.promptLength;
      const alone = await p.pack([e]).gradients();
      loss += n * alone.loss;
      tokens += n;
      alone.grads.forEach((t, i) => {
        for (const [k, v] of Object.entries(t)) sum[i][k] = sum[i][k] ? sum[i][k].map((x, j) => x + n * v[j]) : v.map((x) => n * x);
      });
    }
    expect(Math.abs(together.loss - loss / tokens)).toBeLessThan(1e-5 * Math.abs(together.loss));
    together.grads.forEach((t, i) => {
      for (const [k, v] of Object.entries(t))
        expect(
          relativeError(
            v,
            sum[i][k].map((x) => x / tokens),
          ),
          k,
        ).toBeLessThan(1e-5);
    });
  });

  it('attention_mask hides padding keys: a left-padded row gives the same loss and gradients', async () => {
    const rng = new Rng(24);
    const specs = [spec('loreft', 1, 2, 'f2+l2'), spec('direft', 4, 2, 'l1')];
    const p = new Problem(
      await graphFor([1, 4]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    const plain = await p.pack(randomExamples(rng, [[11, 6]])).gradients();
    const b = p.batch;
    const pad = 3;
    const shift = <T extends BigInt64Array | Float32Array>(a: T, fill: T[number]): T => {
      const out = new (a.constructor as new (n: number) => T)(a.length + pad);
      out.fill(fill as never, 0, pad);
      out.set(a as never, pad);
      return out;
    };
    p.batch = {
      ...b,
      seq: b.seq + pad,
      inputIds: shift(b.inputIds, 0n),
      attentionMask: shift(b.attentionMask, 0n),
      positionIds: shift(b.positionIds, 0n),
      targets: shift(b.targets, 0n),
      lossMask: shift(b.lossMask, 0),
      layers: new Map([...b.layers].map(([l, f]) => [l, { ...f, rows: f.rows.map((r) => r + BigInt(pad)) }])),
    };
    const padded = await p.gradients();
    expect(Math.abs(padded.loss - plain.loss)).toBeLessThan(1e-5 * plain.loss);
    padded.grads.forEach((t, i) => {
      for (const [k, v] of Object.entries(t)) expect(relativeError(v, plain.grads[i][k]), k).toBeLessThan(1e-5);
    });
  });

  it('a layer with no intervened token in the batch gets zero gradients', async () => {
    const rng = new Rng(22);
    const specs = [spec('loreft', 2, 2, 'l1'), spec('direft', 4, 2, 'f2')];
    const p = new Problem(
      await graphFor([2, 4]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    // a 1-token prompt: l1 is capped at 1 // 2 = 0 positions
    const { grads } = await p.pack([{ tokens: [1, 403, 407, 261], promptLength: 1 }]).gradients();
    for (const g of Object.values(grads[0])) expect(g.every((x) => x === 0)).toBe(true);
    expect(grads[1]['source.weight'].some((x) => x !== 0)).toBe(false); // f2 is capped to 0 as well
  });

  it('a batch with nothing to score has loss 0 and zero gradients (no NaN)', async () => {
    const rng = new Rng(23);
    const specs = [spec('loreft', 3, 2, 'f2+l2')];
    const p = new Problem(
      await graphFor([3]),
      specs,
      specs.map((s) => initialTensors(s.kind, s.rank, D, rng)),
    );
    p.pack(randomExamples(rng, [[9, 5]]));
    p.batch.lossMask.fill(0);
    const { loss, grads } = await p.gradients();
    expect(loss === 0).toBe(true); // −0 or 0
    for (const g of Object.values(grads[0])) expect(g.every((x) => x === 0)).toBe(true);
  });
});

describe('training graph: portable ONNX', () => {
  it('uses only standard ai.onnx operators (no contrib ops), for CPU and CUDA alike', () => {
    const bytes = buildTrainingGraph(model.config, model.checkpoint, [0, 2, 4]);
    const m = onnx.ModelProto.decode(bytes);
    expect(m.opsetImport.map((o) => o.domain ?? '')).toEqual(['']);
    const domains = new Set(m.graph!.node!.map((n) => n.domain ?? ''));
    expect([...domains]).toEqual(['']);
    const ops = new Set(m.graph!.node!.map((n) => n.opType));
    for (const op of ops) expect(op).not.toMatch(/^(Fused|Skip|Simplified|GroupQuery|Rotary|QuickGelu)/);
  });

  it('has no backward nodes below the lowest intervened layer', () => {
    const count = (layers: number[]) =>
      onnx.ModelProto.decode(buildTrainingGraph(model.config, model.checkpoint, layers)).graph!.node!.length;
    // moving the only intervention up removes whole layers of backward pass
    expect(count([4])).toBeLessThan(count([2]));
    expect(count([2])).toBeLessThan(count([0]));
  });
});
