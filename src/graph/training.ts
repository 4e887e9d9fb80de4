import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { Tape } from './autodiff/tape.ts';
import { GraphBuilder } from './onnx.ts';
import { ropeTables } from './rope.ts';
import { checkpointWeight } from './weights.ts';

/**
 * The training graph: the frozen decoder's forward pass, the ReFT loss, and the gradient of
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

export function buildTrainingGraph(config: ModelConfig, checkpoint: Checkpoint, layers: readonly number[]): Uint8Array {
  const intervened = [...new Set(layers)].sort((a, b) => a - b);
  for (const l of intervened) {
    if (!Number.isInteger(l) || l < 0 || l >= config.numLayers) throw new Error(`layer ${l} is out of range`);
  }
  const g = new GraphBuilder('reft_training');
  const t = new Tape(g);
  const d = config.hiddenSize;
  const { numHeads, numKvHeads, headDim } = config;
  const group = numHeads / numKvHeads;

  /** A frozen weight over the checkpoint's bytes (half types cast to float32). */
  const weight = (name: string): string => t.declare(checkpointWeight(g, checkpoint, name), checkpoint.weights.get(name)!.shape);
  const linear = (x: string, prefix: string, bias: boolean): string =>
    t.op('Gemm', bias ? [x, weight(`${prefix}.weight`), weight(`${prefix}.bias`)] : [x, weight(`${prefix}.weight`)], { transB: 1 });
  const eps = t.scalar('rms_eps', config.rmsNormEps);
  const lastAxis = t.int64s('last_axis', [-1]);
  /** x / √(mean(x²) + ε) · w, as transformers' LlamaRMSNorm in float32. */
  const rmsNorm = (x: string, w: string): string => {
    const meanSquare = t.op('ReduceMean', [t.op('Mul', [x, x]), lastAxis], { keepdims: 1 });
    const inv = t.op('Reciprocal', [t.op('Sqrt', [t.op('Add', [meanSquare, eps])])]);
    return t.op('Mul', [t.op('Mul', [x, inv]), weight(w)]);
  };

  const B = 'batch';
  const S = 'seq';
  const inputIds = t.input(trainingInputs.inputIds, 'int64', [B, S]);
  const attentionMask = t.input(trainingInputs.attentionMask, 'int64', [B, S]);
  const positionIds = t.input(trainingInputs.positionIds, 'int64', [B, S]);
  const targets = t.input(trainingInputs.targets, 'int64', [B, S]);
  const lossMask = t.input(trainingInputs.lossMask, 'float32', [B, S]);

  const flatTokens = t.int64s('flat', [-1]);
  const embed = weight('model.embed_tokens.weight');
  let h = t.op('Gather', [embed, t.op('Reshape', [inputIds, flatTokens])], { axis: 0 }); // [B·S, d]

  const attnBias = attentionBias(t, inputIds, attentionMask);
  const { cos, sin, rotateHalf } = rotary(t, config, positionIds);
  const scale = t.scalar('attn_scale', 1 / Math.sqrt(headDim));
  // [B, S] ++ [kv_heads, group or 1, head_dim], for viewing the flat projections per head
  const batchSeq = g.op('Shape', [inputIds]);
  const headsShape = (n: number) => g.op('Concat', [batchSeq, g.int64s('heads', [numKvHeads, n, headDim])], { axis: 0 });
  const qShape = headsShape(group);
  const kvShape = headsShape(1);
  const flatHeads = t.int64s('flat_heads', [-1, numHeads * headDim]);
  const applyRotary = (x: string) => t.op('Add', [t.op('Mul', [x, cos]), t.op('Mul', [t.op('MatMul', [x, rotateHalf]), sin])]);

  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    const x = rmsNorm(h, `${p}.input_layernorm.weight`);
    const q5 = t.op('Reshape', [linear(x, `${p}.self_attn.q_proj`, config.attentionBias), qShape], {}, { shape: [B, S, numKvHeads, group, headDim] });
    const k5 = t.op('Reshape', [linear(x, `${p}.self_attn.k_proj`, config.attentionBias), kvShape], {}, { shape: [B, S, numKvHeads, 1, headDim] });
    const v5 = t.op('Reshape', [linear(x, `${p}.self_attn.v_proj`, config.attentionBias), kvShape], {}, { shape: [B, S, numKvHeads, 1, headDim] });
    const q = t.op('Transpose', [t.op('Mul', [applyRotary(q5), scale])], { perm: [0, 2, 3, 1, 4] }); // [B, G, group, S, hd]
    const kT = t.op('Transpose', [applyRotary(k5)], { perm: [0, 2, 3, 4, 1] }); // [B, G, 1, hd, S]
    const v = t.op('Transpose', [v5], { perm: [0, 2, 3, 1, 4] }); // [B, G, 1, S, hd]
    const probs = t.op('Softmax', [t.op('Add', [t.op('MatMul', [q, kT]), attnBias])], { axis: -1 });
    const heads = t.op('Transpose', [t.op('MatMul', [probs, v])], { perm: [0, 3, 1, 2, 4] }); // [B, S, G, group, hd]
    h = t.op('Add', [h, linear(t.op('Reshape', [heads, flatHeads]), `${p}.self_attn.o_proj`, false)]);

    const x2 = rmsNorm(h, `${p}.post_attention_layernorm.weight`);
    const gate = linear(x2, `${p}.mlp.gate_proj`, config.mlpBias);
    const silu = t.op('Mul', [gate, t.op('Sigmoid', [gate])]);
    const up = linear(x2, `${p}.mlp.up_proj`, config.mlpBias);
    h = t.op('Add', [h, linear(t.op('Mul', [silu, up]), `${p}.mlp.down_proj`, config.mlpBias)]);

    if (intervened.includes(l)) h = interventionBlock(t, h, l, d);
  }

  // Only scored tokens reach the vocabulary projection: with a 50k vocabulary the logits of
  // every token of a batch would dwarf the rest of the graph.
  const flatMask = t.op('Reshape', [lossMask, flatTokens]);
  const scored = t.declare(g.op('Reshape', [g.op('NonZero', [flatMask]), flatTokens]), ['scored']);
  const column = t.int64s('column', [-1, 1]);
  const final = rmsNorm(t.op('Gather', [h, scored], { axis: 0 }), 'model.norm.weight');
  const logits = t.op('Gemm', [final, config.tieWordEmbeddings ? embed : weight('lm_head.weight')], { transB: 1 }); // [M, V]
  const logProbs = t.op('LogSoftmax', [logits], { axis: -1 });
  const target = t.op('Reshape', [t.op('Gather', [t.op('Reshape', [targets, flatTokens]), scored], { axis: 0 }), column]);
  const picked = t.op('GatherElements', [logProbs, target], { axis: 1 }); // [M, 1]
  const weights = t.op('Reshape', [t.op('Gather', [flatMask, scored], { axis: 0 }), column]);
  const total = t.op('ReduceSum', [t.op('Mul', [picked, weights])], { keepdims: 0 });
  // max(Σ mask, tiny): an all-zero mask gives loss 0 rather than NaN
  const count = t.declare(g.op('Max', [g.op('ReduceSum', [lossMask], { keepdims: 0 }), g.constant('tiny', Float32Array.of(1e-12), [])]), []);
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
 * Additive attention bias [B, 1, 1, S, S]: causal, and padding keys hidden. Not differentiated,
 * so it is built on the builder directly and only its shape is declared to the tape.
 */
function attentionBias(t: Tape, inputIds: string, attentionMask: string): string {
  const g = t.g;
  const axis0 = g.int64s('axis0', [0]);
  const seq = g.op('Squeeze', [g.op('Shape', [inputIds], { start: 1, end: 2 }), axis0]);
  const range = g.op('Range', [g.constant('zero', BigInt64Array.of(0n), []), seq, g.constant('one', BigInt64Array.of(1n), [])]);
  const future = g.op('Greater', [g.op('Unsqueeze', [range, axis0]), g.op('Unsqueeze', [range, g.int64s('axis1', [1])])]);
  const masked = g.constant('masked', Float32Array.of(MASKED), []);
  const causal = g.op('Where', [future, masked, g.constant('zero_f', Float32Array.of(0), [])]); // [S, S]
  const keep = g.op('Cast', [attentionMask], { to: 1 });
  const padding = g.op('Mul', [g.op('Sub', [g.constant('one_f', Float32Array.of(1), []), keep]), masked]); // [B, S]
  const keys = g.op('Unsqueeze', [padding, g.int64s('axes', [1, 2, 3])]); // [B, 1, 1, 1, S]
  return t.declare(g.op('Add', [causal, keys]), ['batch', 1, 1, 'seq', 'seq']);
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
