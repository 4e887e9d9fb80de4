import type { OpRule } from '../types.ts';
import { Add, Div, Exp, Identity, Log, Mul, Neg, Pow, Reciprocal, Sigmoid, Sqrt, Sub, Tanh, Where } from './elementwise.ts';
import { Gather, GatherElements, GatherND, ScatterND } from './indexing.ts';
import { Expand, Reshape, Squeeze, Transpose, Unsqueeze } from './layout.ts';
import { Gemm, MatMul } from './matmul.ts';
import { LogSoftmax, ReduceMean, ReduceSum, Softmax } from './reductions.ts';

/** Every operator the tape can differentiate, by ONNX op type (all standard ai.onnx, opset 21). */
export const RULES: Readonly<Record<string, OpRule>> = {
  Add,
  Sub,
  Mul,
  Div,
  Pow,
  Neg,
  Exp,
  Log,
  Identity,
  Sqrt,
  Reciprocal,
  Sigmoid,
  Tanh,
  Where,
  MatMul,
  Gemm,
  Reshape,
  Unsqueeze,
  Squeeze,
  Transpose,
  Expand,
  Gather,
  GatherElements,
  GatherND,
  ScatterND,
  ReduceSum,
  ReduceMean,
  Softmax,
  LogSoftmax,
};
