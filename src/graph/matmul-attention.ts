import type { LayerSpec } from '../model/architecture.ts';
import { attentionScale, type ModelConfig } from '../model/config.ts';
import type { Device } from '../runtime/session.ts';
import { ELEM, type GraphBuilder } from './onnx.ts';

/**
 * Whether the inference graph attends in plain MatMul / Softmax operators over the past and the
 * new keys in a run of more than one token per row (a prefill or a prefill chunk), in an If on the
 * input `multi_token` (decode steps, one token per row, keep GroupQueryAttention): on WebGPU.
 * Elsewhere (the CPU, CUDA) every run takes the fused GroupQueryAttention. Chosen per device like
 * the projections (projection-weights.ts).
 *
 * Why not GroupQueryAttention on WebGPU: ORT (1.29 and 1.30) attends to a run of 32 or more new tokens with
 * its FlashAttention shader, whose key-tile loop declares its score accumulators without an
 * initializer (`var qk_1 : vec4<f32>;`, zero on every iteration in WGSL). Dawn's WGSL compiler
 * (Tint) makes them SPIR-V variables initialized once per invocation and stores no zero in the
 * loop (seen in the SPIR-V Mesa receives), so each key tile's scores start from the previous
 * tile's probabilities: every query past the first tile (min(subgroup size, 16) keys; 8 on
 * llvmpipe) gets wrong weights, attention off by a few percent and stories260k's logits by up to
 * 0.5. The driver runs that SPIR-V as written, so a GPU behind Dawn's Vulkan backend that takes
 * the same shader path gets the same result. Shorter runs take ORT's split-reduce kernel, which
 * is exact, but where ORT switches is its own choice (it has moved between releases), so every
 * multi-token run takes the plain operators here; they cost more passes over the scores (a
 * 200-token prefill of stories260k on llvmpipe: 60 → 180 ms), decode steps nothing.
 */
export function prefillsInPlainOperators(device: Device): boolean {
  return device === 'webgpu';
}

/** Additive bias of a hidden key: exp(−1e9 − max) is exactly 0 in float32. */
const MASKED = -1e9;
/** Position given to past slots no row holds, so that every query sees them as future. */
const NOWHERE = 1e9;

interface AttentionValues {
  /** Rotated queries [batch, seq, heads·head_dim]. */
  q: string;
  /** Rotated new keys and the new values [batch, seq, kv_heads·head_dim]. */
  k: string;
  v: string;
  /** The cache [batch, kv_heads, past, head_dim]: each row valid up to its own length. */
  pastKey: string;
  pastValue: string;
  /** Each row's total length − 1 (int32 [batch]), as GroupQueryAttention reads it. */
  seqlensK: string;
}

/**
 * GroupQueryAttention's result for a run of `seq` new tokens per row, in plain operators, built
 * into `g` (an If branch), its results named by `names` where given. Row b's past is its total
 * length (seqlens_k + 1) less `seq`, at least 0 (prompts prefilled together are right-padded);
 * its new keys follow the whole past input, and the mask places each key at its position: past
 * slots beyond the row's length are hidden, new key s sits at past_b + s. Query s (at
 * past_b + s) sees the keys at or before it (within the layer's window). Returns the attention
 * [batch, seq, heads·head_dim] and the presents, the past with the new keys and values appended
 * [batch, kv_heads, past + seq, head_dim]: what GroupQueryAttention returns when each row's past
 * fills the past input, as it does for the runs that carry several tokens (prompts prefilled
 * together start from an empty past; a long prompt's chunk continues its own one-row cache).
 *
 * Positions are float32 (exact far beyond any context) and made on the device from the tensors'
 * shapes: ORT 1.30's WebGPU provider has no int64 Cast (one would run on the CPU), so index ranges
 * are cumulative sums of ones.
 */
export function matmulAttention(
  g: GraphBuilder,
  config: ModelConfig,
  layer: LayerSpec,
  a: AttentionValues,
  names: { out?: string; presentKey?: string; presentValue?: string } = {},
): { out: string; presentKey: string; presentValue: string } {
  const { numHeads, numKvHeads: kv, headDim } = config;
  const group = numHeads / kv;
  const scalar = (hint: string, v: number) => g.constant(hint, Float32Array.of(v), []);
  const axes = (hint: string, v: number[]) => g.int64s(hint, v);

  // [batch, seq, kv·hd] → BNSH, appended to the past along the sequence
  const bnsh = (x: string) => g.op('Transpose', [g.op('Reshape', [x, axes('kv_view', [0, 0, kv, headDim])])], { perm: [0, 2, 1, 3] });
  const presentKey = g.op('Concat', [a.pastKey, bnsh(a.k)], { axis: 2 }, { name: names.presentKey });
  const presentValue = g.op('Concat', [a.pastValue, bnsh(a.v)], { axis: 2 }, { name: names.presentValue });

  // 0, 1, …, n−1 along axis `axis` of `like`, and n ([1]); n ≥ 1 here (seq > 1, keys ≥ seq)
  const indices = (like: string, axis: number): { range: string; count: string } => {
    const ones = g.op('Expand', [scalar('one', 1), g.op('Shape', [like], { start: axis, end: axis + 1 })]);
    const upTo = g.op('CumSum', [ones, g.constant('axis0', BigInt64Array.of(0n), [])]);
    const count = g.op('Slice', [upTo, axes('last', [-1]), axes('end', [Number.MAX_SAFE_INTEGER])]);
    return { range: g.op('Sub', [upTo, scalar('one', 1)]), count };
  };
  const queries = indices(a.q, 1); // [seq]
  const keys = indices(presentKey, 2); // [past + seq]
  const pastSlots = g.op('Sub', [keys.count, queries.count]); // [1]
  const total = g.op('Add', [g.op('Cast', [a.seqlensK], { to: ELEM.float32 }), scalar('one', 1)]); // [batch]
  const past = g.op('Unsqueeze', [g.op('Relu', [g.op('Sub', [total, queries.count])]), axes('axis1', [1])]); // [batch, 1]
  const queryPos = g.op('Unsqueeze', [g.op('Add', [past, queries.range]), axes('axis2', [2])]); // [batch, seq, 1]
  const slotPos = g.op('Where', [g.op('Less', [keys.range, past]), keys.range, scalar('nowhere', NOWHERE)]); // [batch, keys]
  const newPos = g.op('Add', [g.op('Sub', [keys.range, pastSlots]), past]); // [batch, keys]
  const keyPos = g.op('Unsqueeze', [g.op('Where', [g.op('Less', [keys.range, pastSlots]), slotPos, newPos]), axes('axis1', [1])]); // [batch, 1, keys]
  const masked = scalar('masked', MASKED);
  const zero = scalar('zero', 0);
  let bias = g.op('Where', [g.op('Greater', [keyPos, queryPos]), masked, zero]); // [batch, seq, keys]
  if (layer.slidingWindow !== null) {
    const tooFar = g.op('GreaterOrEqual', [g.op('Sub', [queryPos, keyPos]), scalar('window', layer.slidingWindow)]);
    bias = g.op('Add', [bias, g.op('Where', [tooFar, masked, zero])]);
  }
  bias = g.op('Unsqueeze', [bias, axes('axes12', [1, 2])]); // [batch, 1, 1, seq, keys]

  // queries grouped by their kv head: [batch, kv, group, seq, hd] against [batch, kv, 1, hd, keys]
  const scale = attentionScale(config);
  const q5 = g.op('Transpose', [g.op('Reshape', [a.q, axes('q_view', [0, 0, kv, group, headDim])])], { perm: [0, 2, 3, 1, 4] });
  const kT = g.op('Transpose', [g.op('Unsqueeze', [presentKey, axes('axis2', [2])])], { perm: [0, 1, 2, 4, 3] });
  let scores = g.op('MatMul', [g.op('Mul', [q5, scalar('attn_scale', scale)]), kT]);
  const cap = config.layout.attentionSoftcap;
  if (cap !== null) scores = softcapOp(g, scores, cap);
  const probs = g.op('Softmax', [g.op('Add', [scores, bias])], { axis: -1 });
  const heads = g.op('MatMul', [probs, g.op('Unsqueeze', [presentValue, axes('axis2', [2])])]); // [batch, kv, group, seq, hd]
  const flat = axes('flat_heads', [0, 0, numHeads * headDim]);
  const out = g.op('Reshape', [g.op('Transpose', [heads], { perm: [0, 3, 1, 2, 4] }), flat], {}, { name: names.out });
  return { out, presentKey, presentValue };
}

/** cap·tanh(x / cap) in plain operators (Gemma 2's attention and final soft-caps). */
export function softcapOp(g: GraphBuilder, x: string, cap: number, name?: string): string {
  const scaled = g.op('Tanh', [g.op('Div', [x, g.constant('softcap', Float32Array.of(cap), [])])]);
  return g.op('Mul', [scaled, g.constant('softcap', Float32Array.of(cap), [])], {}, { name });
}
