import type { Checkpoint } from '../model/checkpoint.ts';
import { blockGatherable, type QuantizedCheckpoint, type TensorSpan } from '../quant/cache.ts';
import { MS_DOMAIN, type ElemType, type GraphBuilder } from './onnx.ts';
import { checkpointWeights } from './weights.ts';
import type { Device } from '../runtime/session.ts';

/**
 * Where the inference graph's weights come from, and so which operators read them: the one place
 * that chooses the projection operator for a weight format. Float checkpoints project with
 * FusedMatMul (transB, straight over the [out, in] weights); quantized ones with com.microsoft
 * MatMulNBits over the blocks of src/quant/cache.ts, and look up embeddings with
 * GatherBlockQuantized on the same blocks (no float copy of the table).
 */
export interface WeightSource {
  /** A float tensor (norm weights, biases). */
  tensor(name: string): string;
  /** x·[W₁; W₂; …]ᵀ over [out, in] matrices stacked along out; `name` names the result. */
  project(x: string, names: readonly string[], name?: string): string;
  /** x·Wᵀ over the [vocab, d] output matrix `w` (the lm_head, or a tied embedding read as it is). */
  vocabProject(x: string, w: string, name?: string): string;
  /** The rows of the [vocab, d] table `name` for the token ids `ids`. */
  gather(name: string, ids: string): string;
}

/** Bumped when the quantized graph's operators change (it is part of the graph cache key). */
export const QUANTIZED_GRAPH_VERSION = 'qgraph-v2';

/** MatMulNBits' accuracy_level 4: the CPU kernel quantizes activations to int8 per block. */
const ACCURACY_LEVEL = 4;

/**
 * Float weights, in the device's operator: FusedMatMul on the CPU and CUDA; WebGPU has no
 * FusedMatMul kernel, so MatMul over the weight transposed (folded once when the session loads),
 * and Gemm for the lm_head, which reads the weight as it is (a tied embedding stays one copy).
 */
export function floatWeightSource(g: GraphBuilder, checkpoint: Checkpoint, device: Device = 'cpu'): WeightSource {
  const tensor = checkpointWeights(g, checkpoint);
  const matmulT = (x: string, w: string, name?: string): string =>
    device === 'webgpu'
      ? g.op('MatMul', [x, g.op('Transpose', [w], { perm: [1, 0] })], {}, { name })
      : g.op('FusedMatMul', [x, w], { transB: 1 }, { domain: MS_DOMAIN, name });
  return {
    tensor,
    project: (x, names, name) => {
      // stacked weights are folded into one initializer when the session loads
      const w = names.length === 1 ? tensor(names[0]) : g.op('Concat', names.map(tensor), { axis: 0 });
      return matmulT(x, w, name);
    },
    vocabProject: (x, w, name) =>
      device === 'webgpu' ? g.op('Gemm', [x, tensor(w)], { transB: 1 }, { name }) : matmulT(x, tensor(w), name),
    gather: (name, ids) => g.op('Gather', [tensor(name), ids], { axis: 0 }),
  };
}

export function quantizedWeightSource(g: GraphBuilder, q: QuantizedCheckpoint): WeightSource {
  const declared = new Set<string>();
  const ref = (name: string, elemType: ElemType, span: TensorSpan, dims = span.dims): string => {
    if (declared.has(name)) return name;
    declared.add(name);
    return g.external({ name, elemType, dims, location: q.file, offset: span.offset, length: span.length });
  };
  const matrix = (name: string) => {
    const m = q.matrices.get(name);
    if (!m) throw new Error(`graph builder: ${name} was not quantized`);
    return m;
  };
  const tensor = (name: string) => {
    const span = q.floats.get(name);
    if (!span) throw new Error(`graph builder: the quantized checkpoint has no float tensor ${name}`);
    return ref(name, 'float32', span);
  };
  const project = (x: string, names: readonly string[], name?: string): string => {
    const parts = names.map(matrix);
    const { cols, bits, zeroPoints, blockSize } = parts[0];
    if (parts.some((p) => p.cols !== cols || p.bits !== bits || p.zeroPoints !== zeroPoints || p.blockSize !== blockSize)) {
      throw new Error(`graph builder: stacked matrices ${names.join(', ')} differ in input size or format`);
    }
    const stack = (pick: (n: string) => string) => (names.length === 1 ? pick(names[0]) : g.op('Concat', names.map(pick), { axis: 0 }));
    const inputs = [x, stack((n) => ref(`${n}#q`, 'uint8', matrix(n).data)), stack((n) => ref(`${n}#scales`, 'float32', matrix(n).scales))];
    if (zeroPoints) inputs.push(stack((n) => ref(`${n}#zeros`, 'uint8', matrix(n).zeros!)));
    const N = parts.reduce((a, p) => a + p.rows, 0);
    return g.op(
      'MatMulNBits',
      inputs,
      { K: cols, N, bits, block_size: blockSize, accuracy_level: ACCURACY_LEVEL },
      { domain: MS_DOMAIN, name },
    );
  };
  return {
    tensor,
    project,
    vocabProject: (x, w, name) => project(x, [w], name),
    gather: (name, ids) => {
      const m = q.matrices.get(name);
      if (!m || !blockGatherable(m.cols, m.bits, m.blockSize)) return g.op('Gather', [tensor(name), ids], { axis: 0 });
      // the same bytes as the projection's blocks, declared with the row-major shapes the lookup reads
      const { bits } = m;
      const inputs = [
        ref(`${name}#rows`, 'uint8', m.data, [m.rows, (m.cols * bits) / 8]),
        ids,
        ref(`${name}#row_scales`, 'float32', m.scales, [m.rows, m.blocks]),
      ];
      if (m.zeroPoints) inputs.push(ref(`${name}#row_zeros`, 'uint8', m.zeros!, [m.rows, (m.blocks * bits) / 8]));
      return g.op(
        'GatherBlockQuantized',
        inputs,
        { gather_axis: 0, quantize_axis: 1, block_size: m.blockSize, bits },
        { domain: MS_DOMAIN },
      );
    },
  };
}

/**
 * The quantized checkpoint's weights as float tensors, dequantized in the graph with plain ai.onnx
 * operators ((q − z)·s per block, padding sliced off): the training graph's Gemms read them, and
 * its backward pass needs the transposed product that MatMulNBits has no gradient for. The
 * inputs are all initializers, so ORT folds the dequantization once when the session loads:
 * training computes on exactly the quantized model's weights, held as float32 while it runs.
 */
export function dequantizedWeights(g: GraphBuilder, q: QuantizedCheckpoint): (name: string) => string {
  const made = new Map<string, string>();
  const ref = (name: string, elemType: ElemType, span: TensorSpan, dims = span.dims): string =>
    g.external({ name, elemType, dims, location: q.file, offset: span.offset, length: span.length });
  const dequantize = (name: string): string => {
    const floatSpan = q.floats.get(name);
    if (floatSpan) return ref(name, 'float32', floatSpan);
    const m = q.matrices.get(name);
    if (!m) throw new Error(`graph builder: the quantized checkpoint has no tensor ${name}`);
    const { rows, cols, blocks, bits, blockSize } = m;
    const toFloat = (x: string) => g.op('Cast', [x], { to: 1 });
    /** Packed nibbles [..., n] → codes [..., 2n], low nibble first. */
    const unpack = (x: string, dims: number[]) => {
      const low = g.op('BitwiseAnd', [x, g.constantU8('nibble', 15)]);
      const high = g.op('BitShift', [x, g.constantU8('shift', 4)], { direction: 'RIGHT' });
      const pairs = g.op('Concat', [g.op('Unsqueeze', [low, g.int64s('axis', [-1])]), g.op('Unsqueeze', [high, g.int64s('axis', [-1])])], {
        axis: -1,
      });
      return g.op('Reshape', [pairs, g.int64s('unpacked', dims)]);
    };
    const data = ref(`${name}#q`, 'uint8', m.data);
    const codes = toFloat(bits === 8 ? data : unpack(data, [rows, blocks, blockSize]));
    let zero: string;
    if (!m.zeros) zero = g.constant('zero_point', Float32Array.of(1 << (bits - 1)), []);
    else {
      const z = ref(`${name}#zeros`, 'uint8', m.zeros);
      const perRow = bits === 8 ? g.op('Reshape', [z, g.int64s('zero_rows', [rows, blocks])]) : unpack(z, [rows, -1]);
      const exact = bits === 8 ? perRow : g.op('Slice', [perRow, g.int64s('from', [0]), g.int64s('to', [blocks]), g.int64s('axis', [1])]);
      zero = g.op('Unsqueeze', [toFloat(exact), g.int64s('axis', [-1])]);
    }
    const scale = g.op('Reshape', [ref(`${name}#scales`, 'float32', m.scales), g.int64s('scale_rows', [rows, blocks, 1])]);
    const w = g.op('Reshape', [g.op('Mul', [g.op('Sub', [codes, zero]), scale]), g.int64s('rows', [rows, blocks * blockSize])]);
    return cols === blocks * blockSize ? w : g.op('Slice', [w, g.int64s('from', [0]), g.int64s('to', [cols]), g.int64s('axis', [1])]);
  };
  return (name) => {
    let w = made.get(name);
    if (w === undefined) made.set(name, (w = dequantize(name)));
    return w;
  };
}
