import type { LayerSpec, LinearWeights } from '../model/architecture.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import { attentionScale, type ModelConfig } from '../model/config.ts';
import { Tape } from './autodiff/tape.ts';
import { decoderForward, type ForwardOps } from './forward.ts';
import { GraphBuilder } from './onnx.ts';
import { ropeTables } from './rope.ts';
import { trainingOperators, type TrainingDevice, type TrainingOperators } from './training-operators.ts';
import { checkpointWeights, offsetWeight } from './weights.ts';
import { dequantizedWeights } from './projection-weights.ts';
import type { QuantizedCheckpoint } from '../quant/cache.ts';

/**
 * The training graph: the frozen decoder's forward pass (graph/forward.ts, over this file's
 * differentiable operators), the ReFT loss, and the gradient of
 * the loss with respect to the interventions' low-rank factors, computed by our tape
 * (autodiff/). Only standard ai.onnx operators, so it runs on ORT's CUDA provider as on CPU;
 * where a provider lacks a kernel (WebGPU), training-operators.ts picks an equivalent. Integer
 * tensors are only ever indices (WebGPU computes in 32 bits): what is derived from the loss mask
 * is derived on the host.
 *
 * Inputs (B rows, padded to S tokens; padding on the right):
 *   input_ids, position_ids: int64 [B, S]; attention_mask float [B, S] (1 real / 0 padding).
 *   scored int64 [M, 1]: the flattened token indices (b·S + s) whose next token is scored;
 *   scored_targets int64 [M, 1]: that next token; scored_weights float [M, 1]: its weight.
 *   loss = Σ weight · nll / Σ weight: the mean over the batch's completion tokens.
 * Per intervened layer L, after decoder layer L (as in the inference graph; rows index the
 * flattened B·S tokens):
 *   u = ((h[rows]·downᵀ + bias) ⊙ mask),  h[rows] = (h[rows] + u·up) ⊙ dropout
 *   iv.L.rows [K, 1], iv.L.mask [K, R], iv.L.down [R, d], iv.L.bias [R], iv.L.up [R, d],
 *   iv.L.dropout [K, d]: pyreft applies dropout to the whole edited row h + delta; the trainer
 *   feeds a keep-mask scaled by 1/(1 − p), or ones.
 * Outputs: loss, and grad.L.down / grad.L.bias / grad.L.up.
 *
 * The hidden state stays flat, [B·S, d], so every per-token op is a 2-D Gemm; only attention
 * reshapes to [B, S, kv_heads, group, head_dim]. Grouped-query attention needs no Expand: the
 * query heads of one KV head are an extra axis that MatMul broadcasts K and V over.
 */
export const TRAINING_GRAPH_VERSION = 'training-v2';
const TRAINING_OPSETS = { '': 21 };

export const trainingInputs = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  positionIds: 'position_ids',
  scored: 'scored',
  scoredTargets: 'scored_targets',
  scoredWeights: 'scored_weights',
  ivRows: (l: number) => `iv.${l}.rows`,
  ivMask: (l: number) => `iv.${l}.mask`,
  ivDown: (l: number) => `iv.${l}.down`,
  ivBias: (l: number) => `iv.${l}.bias`,
  ivUp: (l: number) => `iv.${l}.up`,
  ivDropout: (l: number) => `iv.${l}.dropout`,
};

export const trainingOutputs = {
  loss: 'loss',
  gradDown: (l: number) => `grad.${l}.down`,
  gradBias: (l: number) => `grad.${l}.bias`,
  gradUp: (l: number) => `grad.${l}.up`,
};

/** Additive attention mask for hidden keys: exp(−1e9 − max) is exactly 0 in float32. */
const MASKED = -1e9;

/** `device` picks the operators its provider implements (training-operators.ts); with `quantized`, the
 * frozen weights are that file's blocks, dequantized in the graph. */
export function buildTrainingGraph(
  config: ModelConfig,
  checkpoint: Checkpoint,
  layers: readonly number[],
  device: TrainingDevice = 'cpu',
  quantized: QuantizedCheckpoint | null = null,
): Uint8Array {
  const intervened = [...new Set(layers)].sort((a, b) => a - b);
  for (const l of intervened) {
    if (!Number.isInteger(l) || l < 0 || l >= config.numLayers) throw new Error(`layer ${l} is out of range`);
  }
  const operators = trainingOperators(device);
  const g = new GraphBuilder('reft_training');
  const t = new Tape(g, operators);
  const d = config.hiddenSize;

  const B = 'batch';
  const S = 'seq';
  const M = 'scored';
  const inputs: TrainingGraphInputs = {
    ids: t.input(trainingInputs.inputIds, 'int64', [B, S]),
    attentionMask: t.input(trainingInputs.attentionMask, 'float32', [B, S]),
    positions: t.input(trainingInputs.positionIds, 'int64', [B, S]),
  };
  // Only scored tokens reach the vocabulary projection: with a 50k vocabulary the logits of
  // every token of a batch would dwarf the rest of the graph.
  const scored = t.input(trainingInputs.scored, 'int64', [M, 1]);
  const targets = t.input(trainingInputs.scoredTargets, 'int64', [M, 1]);
  const weights = t.input(trainingInputs.scoredWeights, 'float32', [M, 1]);

  const logits = decoderForward(trainingOps(t, config, checkpoint, quantized, operators, inputs, intervened, scored), config); // [M, V]
  const picked = targetLogProbs(t, operators, logits, targets); // [M, 1]
  const total = t.op('ReduceSum', [t.op('Mul', [picked, weights])], { keepdims: 0 });
  // max(Σ weight, tiny): nothing to score gives loss 0 rather than NaN
  const count = t.declare(g.op('Max', [g.op('ReduceSum', [weights], { keepdims: 0 }), g.constant('tiny', Float32Array.of(1e-12), [])]), []);
  const loss = t.op('Neg', [t.op('Div', [total, count])]);
  g.output(loss, trainingOutputs.loss, 'float32', []);

  const wrt = intervened.flatMap((l) => [trainingInputs.ivDown(l), trainingInputs.ivBias(l), trainingInputs.ivUp(l)]);
  const grads = t.gradients(loss, wrt);
  intervened.forEach((l, i) => {
    const r = `iv_rank_${l}`;
    g.output(grads[3 * i], trainingOutputs.gradDown(l), 'float32', [r, d]);
    g.output(grads[3 * i + 1], trainingOutputs.gradBias(l), 'float32', [r]);
    g.output(grads[3 * i + 2], trainingOutputs.gradUp(l), 'float32', [r, d]);
  });
  return g.encode(TRAINING_OPSETS);
}

interface TrainingGraphInputs {
  ids: string;
  attentionMask: string;
  positions: string;
}

/** log p(target) of each row of `logits` [M, V], for targets [M, 1]. */
function targetLogProbs(t: Tape, operators: TrainingOperators, logits: string, targets: string): string {
  if (operators.logProbs === 'LogSoftmax')
    return t.op('GatherElements', [t.op('LogSoftmax', [logits], { axis: -1 }), targets], { axis: 1 });
  // z − log Σ exp(z) with z = logits − max: the max only keeps exp in range, so it is left off
  // the tape (the result, and so its gradient, does not depend on it)
  const lastAxis = t.int64s('vocab_axis', [-1]);
  const max = t.declare(t.g.op('ReduceMax', [logits, lastAxis], { keepdims: 1 }), [t.shape(logits)[0], 1]);
  const z = t.op('Sub', [logits, max]);
  const logSumExp = t.op('Log', [t.op('ReduceSum', [t.op('Exp', [z]), lastAxis], { keepdims: 1 })]);
  return t.op('Sub', [t.op('GatherElements', [z, targets], { axis: 1 }), logSumExp]);
}

/**
 * The training graph's operators: ai.onnx only, each with a gradient rule on the tape. The
 * hidden state is flat, [B·S, d].
 */
function trainingOps(
  t: Tape,
  config: ModelConfig,
  checkpoint: Checkpoint,
  quantized: QuantizedCheckpoint | null,
  operators: TrainingOperators,
  inputs: TrainingGraphInputs,
  intervened: readonly number[],
  scored: string,
): ForwardOps {
  const g = t.g;
  const d = config.hiddenSize;
  const { numHeads, numKvHeads, headDim } = config;
  const group = numHeads / numKvHeads;
  const B = 'batch';
  const S = 'seq';

  /** A frozen weight over the checkpoint's bytes (half types cast to float32), or dequantized blocks. */
  const checkpointWeight = quantized ? dequantizedWeights(g, quantized) : checkpointWeights(g, checkpoint);
  const weight = (name: string): string => t.declare(checkpointWeight(name), checkpoint.weights.get(name)!.shape);
  const normWeights = new Map<string, string>();
  const normWeight = (name: string): string => {
    let w = normWeights.get(name);
    if (w === undefined)
      normWeights.set(
        name,
        (w = t.declare(offsetWeight(g, checkpointWeight(name), config.layout.normOffset), checkpoint.weights.get(name)!.shape)),
      );
    return w;
  };
  const linear = (x: string, w: LinearWeights): string =>
    t.op('Gemm', w.bias ? [x, weight(w.weight), weight(w.bias)] : [x, weight(w.weight)], { transB: 1 });
  const eps = t.scalar('rms_eps', config.rmsNormEps);
  const lastAxis = t.int64s('last_axis', [-1]);
  /** x / √(mean(x²) + ε) · w, as transformers' LlamaRMSNorm in float32. */
  const norm = (x: string, w: string): string => {
    const meanSquare = t.op('ReduceMean', [t.op('Mul', [x, x]), lastAxis], { keepdims: 1 });
    const inv = t.op('Reciprocal', [t.op('Sqrt', [t.op('Add', [meanSquare, eps])])]);
    return t.op('Mul', [t.op('Mul', [x, inv]), normWeight(w)]);
  };

  const masks = attentionMasks(t, operators, inputs.ids, inputs.attentionMask);
  const { cos, sin, rotateHalf } = rotary(t, config, inputs.positions);
  const scale = t.scalar('attn_scale', attentionScale(config));
  // [B, S] ++ [kv_heads, group or 1, head_dim], for viewing the flat projections per head
  const batchSeq = g.op('Shape', [inputs.ids]);
  const headsShape = (n: number) => g.op('Concat', [batchSeq, g.int64s('heads', [numKvHeads, n, headDim])], { axis: 0 });
  const qShape = headsShape(group);
  const kvShape = headsShape(1);
  const flatHeads = t.int64s('flat_heads', [-1, numHeads * headDim]);
  const applyRotary = (x: string) => t.op('Add', [t.op('Mul', [x, cos]), t.op('Mul', [t.op('MatMul', [x, rotateHalf]), sin])]);
  const softcap = (x: string, cap: number) =>
    t.op('Mul', [t.op('Tanh', [t.op('Mul', [x, t.scalar('softcap_inv', 1 / cap)])]), t.scalar('softcap', cap)]);

  const attention = (x: string, layer: LayerSpec): string => {
    const view = (w: LinearWeights, norm_: string | null, shape: string, n: number) => {
      const v = t.op('Reshape', [linear(x, w), shape], {}, { shape: [B, S, numKvHeads, n, headDim] });
      return norm_ ? norm(v, norm_) : v;
    };
    const q5 = view(layer.q, layer.qNorm, qShape, group);
    const k5 = view(layer.k, layer.kNorm, kvShape, 1);
    const v5 = view(layer.v, null, kvShape, 1);
    const q = t.op('Transpose', [t.op('Mul', [applyRotary(q5), scale])], { perm: [0, 2, 3, 1, 4] }); // [B, G, group, S, hd]
    const kT = t.op('Transpose', [applyRotary(k5)], { perm: [0, 2, 3, 4, 1] }); // [B, G, 1, hd, S]
    const v = t.op('Transpose', [v5], { perm: [0, 2, 3, 1, 4] }); // [B, G, 1, S, hd]
    let scores = t.op('MatMul', [q, kT]);
    if (config.layout.attentionSoftcap !== null) scores = softcap(scores, config.layout.attentionSoftcap);
    const probs = t.op('Softmax', [t.op('Add', [scores, masks(layer.slidingWindow)])], { axis: -1 });
    const heads = t.op('Transpose', [t.op('MatMul', [probs, v])], { perm: [0, 3, 1, 2, 4] }); // [B, S, G, group, hd]
    return t.op('Reshape', [heads, flatHeads]);
  };

  /** gelu's tanh approximation: x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³))) */
  const geluTanh = (x: string) => {
    const cube = t.op('Mul', [t.op('Mul', [x, x]), x]);
    const inner = t.op('Mul', [
      t.op('Add', [x, t.op('Mul', [cube, t.scalar('gelu_c', 0.044715)])]),
      t.scalar('gelu_k', Math.sqrt(2 / Math.PI)),
    ]);
    return t.op('Mul', [t.op('Mul', [x, t.scalar('half', 0.5)]), t.op('Add', [t.scalar('one', 1), t.op('Tanh', [inner])])]);
  };

  return {
    embed: (w, s) => {
      const h = t.op('Reshape', [t.op('Gather', [weight(w), inputs.ids], { axis: 0 }), t.int64s('flat_hidden', [-1, d])]); // [B·S, d]
      return s === null ? h : t.op('Mul', [h, t.scalar('embed_scale', s)]);
    },
    norm,
    addNorm: (residual, x, w) => {
      const sum = t.op('Add', [residual, x]);
      return { sum, normed: norm(sum, w) };
    },
    add: (a, b) => t.op('Add', [a, b]),
    linear,
    attention,
    gatedActivation: (x, layer) => {
      const gate = linear(x, layer.gate);
      const act = config.layout.activation === 'silu' ? t.op('Mul', [gate, t.op('Sigmoid', [gate])]) : geluTanh(gate);
      return t.op('Mul', [act, linear(x, layer.up)]);
    },
    intervene: (h, l) => (intervened.includes(l) ? interventionBlock(t, h, l, d) : h),
    logitRows: (h) => t.op('GatherND', [h, scored]),
    logits: (x, w, cap) => {
      const logits = t.op('Gemm', [x, weight(w)], { transB: 1 });
      return cap === null ? logits : softcap(logits, cap);
    },
  };
}

/** h[rows] = (h[rows] + ((h[rows]·downᵀ + bias) ⊙ mask)·up) ⊙ dropout, on the flat stream. */
function interventionBlock(t: Tape, h: string, l: number, d: number): string {
  const K = `iv_rows_${l}`;
  const R = `iv_rank_${l}`;
  const rows = t.input(trainingInputs.ivRows(l), 'int64', [K, 1]);
  const mask = t.input(trainingInputs.ivMask(l), 'float32', [K, R]);
  const down = t.input(trainingInputs.ivDown(l), 'float32', [R, d]);
  const bias = t.input(trainingInputs.ivBias(l), 'float32', [R]);
  const up = t.input(trainingInputs.ivUp(l), 'float32', [R, d]);
  const dropout = t.input(trainingInputs.ivDropout(l), 'float32', [K, d]);
  const sel = t.op('GatherND', [h, rows]);
  const u = t.op('Mul', [t.op('Gemm', [sel, down, bias], { transB: 1 }), mask]);
  const edited = t.op('Mul', [t.op('Gemm', [u, up, sel]), dropout]);
  return t.op('ScatterND', [h, rows, edited]);
}

/**
 * Additive attention biases [B, 1, 1, S, S]: causal, padding keys hidden, and for a sliding
 * window the keys `window` or more positions back hidden too; one per window size, made on first
 * use. Not differentiated, so built on the builder directly and only their shape is declared.
 */
function attentionMasks(t: Tape, operators: TrainingOperators, inputIds: string, attentionMask: string): (window: number | null) => string {
  const g = t.g;
  const axis0 = g.int64s('axis0', [0]);
  // positions are compared as int64, or as float32 (exact far beyond any context length)
  const position = (hint: string, v: number) =>
    operators.positions === 'int64' ? g.constant(hint, BigInt64Array.of(BigInt(v)), []) : g.constant(hint, Float32Array.of(v), []);
  let seq = g.op('Squeeze', [g.op('Shape', [inputIds], { start: 1, end: 2 }), axis0]);
  if (operators.positions === 'float32') seq = g.op('Cast', [seq], { to: 1 });
  const range = g.op('Range', [position('zero', 0), seq, position('one', 1)]);
  const keyPos = g.op('Unsqueeze', [range, axis0]); // [1, S]
  const queryPos = g.op('Unsqueeze', [range, g.int64s('axis1', [1])]); // [S, 1]
  const masked = g.constant('masked', Float32Array.of(MASKED), []);
  const zero = g.constant('zero_f', Float32Array.of(0), []);
  const padding = g.op('Mul', [g.op('Sub', [g.constant('one_f', Float32Array.of(1), []), attentionMask]), masked]); // [B, S]
  const keys = g.op('Unsqueeze', [padding, g.int64s('axes', [1, 2, 3])]); // [B, 1, 1, 1, S]
  const made = new Map<number | null, string>();
  return (window) => {
    let bias = made.get(window);
    if (bias !== undefined) return bias;
    let hidden = g.op('Greater', [keyPos, queryPos]); // [S, S]: the future
    if (window !== null) {
      const tooFar = g.op('GreaterOrEqual', [g.op('Sub', [queryPos, keyPos]), position('window', window)]);
      hidden = g.op('Or', [hidden, tooFar]);
    }
    bias = t.declare(g.op('Add', [g.op('Where', [hidden, masked, zero]), keys]), ['batch', 1, 1, 'seq', 'seq']);
    made.set(window, bias);
    return bias;
  };
}

/**
 * Rotary embedding in transformers' rotate-half layout: x·cos + rotate_half(x)·sin, with
 * rotate_half(x) = [−x₂, x₁] written as x·P for a constant signed permutation P (one MatMul,
 * exact in float32, and its gradient is the MatMul rule's). cos/sin [B, S, 1, 1, head_dim]
 * broadcast over the heads.
 */
function rotary(t: Tape, config: ModelConfig, positionIds: string): { cos: string; sin: string; rotateHalf: string } {
  const rope = ropeTables(config);
  const { half } = rope;
  const hd = config.headDim;
  const n = rope.positions;
  // the inference tables hold each angle once; here it is repeated for both halves of a head
  const cosTable = new Float32Array(n * hd);
  const sinTable = new Float32Array(n * hd);
  for (let p = 0; p < n; p++) {
    for (let i = 0; i < half; i++) {
      cosTable[p * hd + i] = cosTable[p * hd + i + half] = rope.cos[p * half + i];
      sinTable[p * hd + i] = sinTable[p * hd + i + half] = rope.sin[p * half + i];
    }
  }
  const perm = new Float32Array(hd * hd);
  for (let j = 0; j < half; j++) {
    perm[(j + half) * hd + j] = -1; // out[j] = −x[j + half]
    perm[j * hd + j + half] = 1; // out[j + half] = x[j]
  }
  const heads = t.int64s('head_axes', [2, 3]);
  const table = (name: string, data: Float32Array) =>
    t.op('Unsqueeze', [t.op('Gather', [t.constant(name, data, [n, hd]), positionIds], { axis: 0 }), heads]);
  return { cos: table('rope_cos', cosTable), sin: table('rope_sin', sinTable), rotateHalf: t.constant('rotate_half', perm, [hd, hd]) };
}
