import type { AttrValue } from '../onnx.ts';
import type { Shape } from './shape.ts';

/** One recorded forward node (every op the tape records has a single output). */
export interface TapeNode {
  readonly op: string;
  readonly inputs: readonly string[];
  readonly output: string;
  readonly attrs: Readonly<Record<string, AttrValue>>;
}

/** What a rule may ask about forward values while inferring shapes. */
export interface ShapeQuery {
  shape(value: string): Shape;
  /** The values of an int64 constant (axes, reshape targets); throws for anything else. */
  ints(value: string): readonly number[];
}

/** What a rule may use to emit its backward nodes. */
export interface Backward extends ShapeQuery {
  op(type: string, inputs: string[], attrs?: Record<string, AttrValue>): string;
  /** A float32 scalar constant (shared per value). */
  scalar(v: number): string;
  /** An int64 vector constant. */
  int64s(values: readonly number[]): string;
  /** The runtime shape of a forward value (one Shape node per value). */
  dynamicShape(value: string): string;
  zerosLike(value: string): string;
  /** The element count of a value, as a float32 scalar. */
  elementCount(value: string): string;
  /** Sums `dx` (shaped like `from`) over the axes a broadcast added, so it takes `to`'s shape. */
  unbroadcast(dx: string, from: Shape, to: string): string;
}

/**
 * An operator the tape can differentiate: its output shape and the vector-Jacobian product.
 * `wants[i]` tells which inputs need a gradient; the rule returns one per input (null when
 * not wanted or not differentiable).
 */
export interface OpRule {
  shape(node: TapeNode, q: ShapeQuery): Shape;
  backward(b: Backward, node: TapeNode, dy: string, wants: readonly boolean[]): Array<string | null>;
}
