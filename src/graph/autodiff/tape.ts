import type { AttrValue, ElemType, GraphBuilder } from '../onnx.ts';
import { trainingOperators, type TrainingOperators } from '../training-operators.ts';
import { RULES } from './rules/index.ts';
import type { Shape } from './shape.ts';
import type { Backward, ShapeQuery, TapeNode } from './types.ts';

/**
 * Graph-level reverse-mode autodiff over a GraphBuilder. Forward ops go through `op`, which
 * records the node and its static shape; `gradients(y, wrt)` then walks the recorded nodes
 * backwards and appends, through each operator's rule (rules/), the nodes computing ∂y/∂wrt.
 * Only nodes on a path from some `wrt` to `y` get backward nodes: frozen weights and every
 * layer below the lowest differentiated input cost nothing.
 */
export class Tape {
  private readonly nodes: TapeNode[] = [];
  private readonly shapes = new Map<string, Shape>();
  private readonly intConsts = new Map<string, number[]>();

  private readonly backward: Backward;

  /** `operators`: how the backward pass makes zeros and element counts on the graph's device. */
  constructor(
    readonly g: GraphBuilder,
    operators: Pick<TrainingOperators, 'zeros' | 'size'> = trainingOperators('cpu'),
  ) {
    this.backward = new BackwardContext(g, this.query, operators);
  }

  input(name: string, elemType: ElemType, dims: Shape): string {
    this.g.input(name, elemType, [...dims]);
    this.shapes.set(name, dims);
    return name;
  }

  /** Gives a shape to a value made directly on the builder (masks, frozen weights). */
  declare(value: string, shape: Shape): string {
    this.shapes.set(value, shape);
    return value;
  }

  constant(hint: string, data: Float32Array | BigInt64Array, dims: number[]): string {
    const name = this.g.constant(hint, data, dims);
    this.shapes.set(name, dims);
    if (data instanceof BigInt64Array) this.intConsts.set(name, [...data].map(Number));
    return name;
  }

  int64s(hint: string, values: readonly number[]): string {
    return this.constant(hint, BigInt64Array.from(values.map(BigInt)), [values.length]);
  }

  scalar(hint: string, v: number): string {
    return this.constant(hint, Float32Array.of(v), []);
  }

  /**
   * Appends and records a node. Its shape comes from the operator's rule, or from `opts.shape`
   * for ops without one (those can't carry gradients).
   */
  op(type: string, inputs: string[], attrs: Record<string, AttrValue> = {}, opts: { shape?: Shape } = {}): string {
    const output = this.g.op(type, inputs, attrs);
    const node: TapeNode = { op: type, inputs, output, attrs };
    this.nodes.push(node);
    const rule = RULES[type];
    if (opts.shape) this.shapes.set(output, opts.shape);
    else if (rule) this.shapes.set(output, rule.shape(node, this.query));
    else throw new Error(`tape: op ${type} has no rule; give its output shape`);
    return output;
  }

  shape(value: string): Shape {
    const s = this.shapes.get(value);
    if (!s) throw new Error(`tape: no shape known for ${value}`);
    return s;
  }

  private readonly query = {
    shape: (v: string) => this.shape(v),
    ints: (v: string) => {
      const c = this.intConsts.get(v);
      if (!c) throw new Error(`tape: ${v} must be an int64 constant`);
      return c;
    },
  };

  /**
   * Appends the backward pass and returns ∂y/∂w for each w in `wrt` (y must be a scalar).
   * Inputs y does not depend on get zeros.
   */
  gradients(y: string, wrt: readonly string[]): string[] {
    const reach = new Set(wrt);
    for (const n of this.nodes) if (n.inputs.some((i) => reach.has(i))) reach.add(n.output);
    if (!reach.has(y)) return wrt.map((w) => this.backward.zerosLike(w));

    const grads = new Map<string, string>([[y, this.backward.scalar(1)]]);
    for (let i = this.nodes.length - 1; i >= 0; i--) {
      const node = this.nodes[i];
      const dy = grads.get(node.output);
      if (dy === undefined) continue; // only values in `reach` ever get a gradient
      const rule = RULES[node.op];
      if (!rule) throw new Error(`tape: no gradient rule for ${node.op}`);
      const wants = node.inputs.map((v) => reach.has(v));
      const dxs = rule.backward(this.backward, node, dy, wants);
      node.inputs.forEach((v, k) => {
        const dx = dxs[k];
        if (!wants[k] || !dx) return;
        const prev = grads.get(v);
        grads.set(v, prev === undefined ? dx : this.g.op('Add', [prev, dx]));
      });
    }
    return wrt.map((w) => grads.get(w) ?? this.backward.zerosLike(w));
  }
}

class BackwardContext implements Backward {
  private readonly scalars = new Map<number, string>();
  private readonly shapesOf = new Map<string, string>();

  constructor(
    private readonly g: GraphBuilder,
    private readonly q: ShapeQuery,
    private readonly operators: Pick<TrainingOperators, 'zeros' | 'size'>,
  ) {}

  shape(v: string): Shape {
    return this.q.shape(v);
  }
  ints(v: string): readonly number[] {
    return this.q.ints(v);
  }

  op(type: string, inputs: string[], attrs: Record<string, AttrValue> = {}): string {
    return this.g.op(type, inputs, attrs);
  }

  scalar(v: number): string {
    let c = this.scalars.get(v);
    if (!c) this.scalars.set(v, (c = this.g.constant('grad_scalar', Float32Array.of(v), [])));
    return c;
  }

  int64s(values: readonly number[]): string {
    return this.g.int64s('grad_ints', [...values]);
  }

  dynamicShape(v: string): string {
    let s = this.shapesOf.get(v);
    if (!s) this.shapesOf.set(v, (s = this.g.op('Shape', [v])));
    return s;
  }

  zerosLike(v: string): string {
    // ConstantOfShape's default value is a float32 zero.
    if (this.operators.zeros === 'ConstantOfShape') return this.g.op('ConstantOfShape', [this.dynamicShape(v)]);
    return this.g.op('Expand', [this.scalar(0), this.dynamicShape(v)]);
  }

  elementCount(v: string): string {
    const count =
      this.operators.size === 'Size' ? this.g.op('Size', [v]) : this.g.op('ReduceProd', [this.dynamicShape(v)], { keepdims: 0 });
    return this.g.op('Cast', [count], { to: 1 });
  }

  unbroadcast(dx: string, from: Shape, to: string): string {
    const target = this.shape(to);
    const lead = from.length - target.length;
    const axes: number[] = [];
    for (let i = 0; i < from.length; i++) {
      if (i < lead || (target[i - lead] === 1 && from[i] !== 1)) axes.push(i);
    }
    if (axes.length === 0) return dx;
    const summed = this.g.op('ReduceSum', [dx, this.int64s(axes)], { keepdims: 1 });
    return lead > 0 ? this.g.op('Reshape', [summed, this.dynamicShape(to)]) : summed;
  }
}
