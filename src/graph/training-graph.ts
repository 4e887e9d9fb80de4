import type { LayerSpec, LinearWeights } from '../model/architecture.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { Tape } from './autodiff/tape.ts';
import { decoderForward, type ForwardOps } from './forward.ts';
import { GraphBuilder } from './onnx.ts';
import { ropeTables } from './rope.ts';
import { checkpointWeights, offsetWeight } from './weights.ts';
import { dequantizedWeights } from './projection-weights.ts';
import type { QuantizedCheckpoint } from '../quant/cache.ts';

/**
 * The training graph: the frozen decoder's forward pass (graph/forward.ts, over this file's
 * differentiable operators), the ReFT loss, and the gradient of
 * the loss with respect to the interventions' low-rank factors, computed by our tape
 * (autodiff/). Only standard ai.onnx operators, so it runs on ORT's CUDA provider as on CPU.
 *
 * Inputs (B rows, padded to S tokens; padding on the right):
 *   input_ids, attention_mask (1 real / 0 padding), position_ids, targets (the next token):
 *   int64 [B, S]; loss_mask float [B, S], 1 where −log p(targets[b, s]) counts.
 *   loss = Σ loss_mask · nll / Σ loss_mask: the mean over the batch's completion tokens.
 * Per intervened layer L, after decoder layer L (as in the inference graph; rows index the
 * flattened B·S tokens):
 *   u = ((h[rows]·downᵀ + bias) ⊙ mask),  h[rows] = (h[rows] + u·up) ⊙ dropout
 *   iv.L.rows [K], iv.L.mask [K, R], iv.L.down [R, d], iv.L.bias [R], iv.L.up [R, d],
 *   iv.L.dropout [K, d]: pyreft applies dropout to the whole edited row h + delta; the trainer
 *   feeds a keep-mask scaled by 1/(1 − p), or ones.
 * Outputs: loss, and grad.L.down / grad.L.bias / grad.L.up.
 *
 * The hidden state stays flat, [B·S, d], so every per-token op is a 2-D Gemm; only attention
 * reshapes to [B, S, kv_heads, group, head_dim]. Grouped-query attention needs no Expand: the
 * query heads of one KV head are an extra axis that MatMul broadcasts K and V over.
 */
export const TRAINING_GRAPH_VERSION = 'training-v1';
const TRAINING_OPSETS = { '': 21 };

export const trainingInputs = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  positionIds: 'position_ids',
  targets: 'targets',
  lossMask: 'loss_mask',
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

/** With `quantized`, the frozen weights are that file's blocks, dequantized in the graph. */
export function buildTrainingGraph(
  config: ModelConfig,
  checkpoint: Checkpoint,
  layers: readonly number[],
  quantized: QuantizedCheckpoint | null = null,
): Uint8Array {
  const intervened = [...new Set(layers)].sort((a, b) => a - b);
  for (const l of intervened) {
    if (!Number.isInteger(l) || l < 0 || l >= config.numLayers) throw new Error(`layer ${l} is out of range`);
  }
  const g = new GraphBuilder('reft_training');
  const t = new Tape(g);
  const d = config.hiddenSize;

  const B = 'batch';
  const S = 'seq';
  const inputs: TrainingGraphInputs = {
    ids: t.input(trainingInputs.inputIds, 'int64', [B, S]),
    attentionMask: t.input(trainingInputs.attentionMask, 'int64', [B, S]),
    positions: t.input(trainingInputs.positionIds, 'int64', [B, S]),
    targets: t.input(trainingInputs.targets, 'int64', [B, S]),
    lossMask: t.input(trainingInputs.lossMask, 'float32', [B, S]),
  };
  const flatTokens = t.int64s('flat', [-1]);
  // Only scored tokens reach the vocabulary projection: with a 50k vocabulary the logits of
  // every token of a batch would dwarf the rest of the graph.
  const flatMask = t.op('Reshape', [inputs.lossMask, flatTokens]);
  const scored = t.declare(g.op('Reshape', [g.op('NonZero', [flatMask]), flatTokens]), ['scored']);

  const logits = decoderForward(trainingOps(t, config, checkpoint, quantized, inputs, intervened, scored, flatTokens), config); // [M, V]
  const column = t.int64s('column', [-1, 1]);
  const logProbs = t.op('LogSoftmax', [logits], { axis: -1 });
  const target = t.op('Reshape', [t.op('Gather', [t.op('Reshape', [inputs.targets, flatTokens]), scored], { axis: 0 }), column]);
  const picked = t.op('GatherElements', [logProbs, target], { axis: 1 }); // [M, 1]
  const weights = t.op('Reshape', [t.op('Gather', [flatMask, scored], { axis: 0 }), column]);
  const total = t.op('ReduceSum', [t.op('Mul', [picked, weights])], { keepdims: 0 });
  // max(Σ mask, tiny): an all-zero mask gives loss 0 rather than NaN
  const count = t.declare(
    g.op('Max', [g.op('ReduceSum', [inputs.lossMask], { keepdims: 0 }), g.constant('tiny', Float32Array.of(1e-12), [])]),
    [],
  );
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
  targets: string;
  lossMask: string;
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
  inputs: TrainingGraphInputs,
  intervened: readonly number[],
  scored: string,
  flatTokens: string,
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

  const masks = attentionMasks(t, inputs.ids, inputs.attentionMask);
  const { cos, sin, rotateHalf } = rotary(t, config, inputs.positions);
  const scale = t.scalar('attn_scale', config.layout.attentionScale ?? 1 / Math.sqrt(headDim));
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
      const h = t.op('Gather', [weight(w), t.op('Reshape', [inputs.ids, flatTokens])], { axis: 0 }); // [B·S, d]
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
    logitRows: (h) => t.op('Gather', [h, scored], { axis: 0 }),
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
  const rows = t.input(trainingInputs.ivRows(l), 'int64', [K]);
  const mask = t.input(trainingInputs.ivMask(l), 'float32', [K, R]);
  const down = t.input(trainingInputs.ivDown(l), 'float32', [R, d]);
  const bias = t.input(trainingInputs.ivBias(l), 'float32', [R]);
  const up = t.input(trainingInputs.ivUp(l), 'float32', [R, d]);
  const dropout = t.input(trainingInputs.ivDropout(l), 'float32', [K, d]);
  const sel = t.op('Gather', [h, rows], { axis: 0 });
  const u = t.op('Mul', [t.op('Gemm', [sel, down, bias], { transB: 1 }), mask]);
  const edited = t.op('Mul', [t.op('Gemm', [u, up, sel]), dropout]);
  return t.op('ScatterND', [h, t.op('Unsqueeze', [rows, t.int64s('axes', [1])]), edited]);
}

/**
 * Additive attention biases [B, 1, 1, S, S]: causal, padding keys hidden, and for a sliding
 * window the keys `window` or more positions back hidden too; one per window size, made on first
 * use. Not differentiated, so built on the builder directly and only their shape is declared.
 */
function attentionMasks(t: Tape, inputIds: string, attentionMask: string): (window: number | null) => string {
  const g = t.g;
  const axis0 = g.int64s('axis0', [0]);
  const seq = g.op('Squeeze', [g.op('Shape', [inputIds], { start: 1, end: 2 }), axis0]);
  const range = g.op('Range', [g.constant('zero', BigInt64Array.of(0n), []), seq, g.constant('one', BigInt64Array.of(1n), [])]);
  const keyPos = g.op('Unsqueeze', [range, axis0]); // [1, S]
  const queryPos = g.op('Unsqueeze', [range, g.int64s('axis1', [1])]); // [S, 1]
  const masked = g.constant('masked', Float32Array.of(MASKED), []);
  const zero = g.constant('zero_f', Float32Array.of(0), []);
  const keep = g.op('Cast', [attentionMask], { to: 1 });
  const padding = g.op('Mul', [g.op('Sub', [g.constant('one_f', Float32Array.of(1), []), keep]), masked]); // [B, S]
  const keys = g.op('Unsqueeze', [padding, g.int64s('axes', [1, 2, 3])]); // [B, 1, 1, 1, S]
  const made = new Map<number | null, string>();
  return (window) => {
    let bias = made.get(window);
    if (bias !== undefined) return bias;
    let hidden = g.op('Greater', [keyPos, queryPos]); // [S, S]: the future
    if (window !== null) {
      const tooFar = g.op('GreaterOrEqual', [g.op('Sub', [queryPos, keyPos]), g.constant('window', BigInt64Array.of(BigInt(window)), [])]);
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
