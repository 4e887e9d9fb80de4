/**
 * The operators the training graph emits where ONNX Runtime's execution providers differ, chosen
 * here once per device (and part of the graph cache key). The CPU and CUDA get the fused
 * kernels; ORT's WebGPU provider (1.30, and the pinned 1.29) lacks ConstantOfShape, LogSoftmax,
 * Size and an int64 Range, so its graph builds the same values from kernels it has (verified by
 * the node placement test in test/webgpu-training.test.ts).
 */
export type TrainingDevice = 'cpu' | 'cuda' | 'webgpu';

export interface TrainingOperators {
  /** Zeros of a runtime shape: ConstantOfShape, or a float 0 Expanded to it. */
  zeros: 'ConstantOfShape' | 'Expand';
  /** A value's element count: Size, or the product of its Shape (computed with the shapes). */
  size: 'Size' | 'ShapeProduct';
  /**
   * log p(target) per scored row: LogSoftmax over the vocabulary then the target's entry, or the
   * target's logit minus the row's log-sum-exp (shifted by the row's max, which the gradient
   * ignores since the result does not depend on it).
   */
  logProbs: 'LogSoftmax' | 'LogSumExp';
  /** The element type the attention masks compare token positions in (Range over it). */
  positions: 'int64' | 'float32';
}

const FUSED: TrainingOperators = { zeros: 'ConstantOfShape', size: 'Size', logProbs: 'LogSoftmax', positions: 'int64' };
const WEBGPU: TrainingOperators = { zeros: 'Expand', size: 'ShapeProduct', logProbs: 'LogSumExp', positions: 'float32' };

export function trainingOperators(device: TrainingDevice = 'cpu'): TrainingOperators {
  return device === 'webgpu' ? WEBGPU : FUSED;
}
