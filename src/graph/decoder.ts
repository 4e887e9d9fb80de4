import type { Device } from '../runtime/session.ts';
import type { LayerSpec, LinearWeights } from '../model/architecture.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import { attentionScale, type ModelConfig } from '../model/config.ts';
import { decoderForward, type ForwardOps } from './forward.ts';
import { ELEM, GraphBuilder, MS_DOMAIN, float, subgraph, type AttrValue } from './onnx.ts';
import type { QuantizedCheckpoint } from '../quant/cache.ts';
import { matmulAttention, prefillsInPlainOperators, softcapOp } from './matmul-attention.ts';
import { floatWeightSource, quantizedWeightSource, type WeightSource } from './projection-weights.ts';
import { ropeTables } from './rope.ts';
import { offsetWeight } from './weights.ts';

/**
 * The inference graph of a decoder (any architecture of src/model/architecture.ts: the forward
 * pass is graph/forward.ts, this file chooses its operators), with ReFT interventions as inputs.
 *
 * One graph serves prefill and decode. Each call processes `batch` rows of `seq` new tokens on
 * top of a KV cache the caller keeps (`past_key.L` / `past_value.L`, BNSH, any past length per
 * row via `seqlens_k`), and returns only the new K and V rows so the caller appends them without
 * the binding copying the whole cache back. Logits are computed only for the (row, position)
 * pairs in `logit_index` [n, 2].
 *
 * Two attention layouts, as onnxruntime-genai's builder chooses:
 * - `packed` (head_dim a multiple of 16, what GroupQueryAttention's own rotary needs): one
 *   FusedMatMul over the concatenated q/k/v weights feeds GQA, which rotates q and k itself.
 *   The graph returns that packed projection (`qkv.L`, [batch, seq, (heads + 2·kv_heads)·head_dim]);
 *   the caller takes k and v from it and rotates k with the same tables (src/graph/rope.ts).
 * - `separate`: q, k, v projections, per-head q/k norms where the architecture has them,
 *   RotaryEmbedding on q and k, GQA without rotary; the graph returns the rotated `new_key.L`
 *   and `new_value.L` ([batch, seq, kv_heads·head_dim]).
 * GroupQueryAttention also takes the architecture's attention scale, soft-cap and sliding
 * window (`local_window_size`: the keys a query sees, its own included).
 *
 * Under a host cache on the CPU, a decode step (one token a row) over a past of at least
 * DECODE_ATTENTION_MIN_CAPACITY slots attends in plain operators instead (decodeAttention, in an
 * If): GQA writes a present of past + new, which the host drops, so it would zero and copy the
 * whole past of every layer each step. That path reads the past tensors whole, padding
 * included (masked from `seqlens_k`), so every layer's past must share one capacity (the past
 * of layer 0 gives it) and hold finite values past each row's length.
 *
 * Projections are built for the device: on the CPU (and CUDA) FusedMatMul with `transB` reads
 * the `[out, in]` weights as they are; ORT's WebGPU provider has no FusedMatMul kernel (the node
 * would fall back to the CPU, with copies both ways each step), so there each projection is a
 * MatMul over the weight transposed once when the session loads (a Transpose of an initializer,
 * folded), and the lm_head a Gemm with `transB` (its input is 2-D), which keeps a tied
 * embedding in one copy.
 *
 * Attention is chosen per device too (matmul-attention.ts): under WebGPU a run of several tokens
 * per row (`multi_token`, set by the caller) attends in plain MatMul / Softmax operators, in an If
 * per layer whose other branch is GroupQueryAttention for decode steps, because ORT's WebGPU
 * GroupQueryAttention prefills 32 tokens or more with a shader that Dawn miscompiles.
 *
 * After decoder layer L, the interventions of the batch edit the residual stream:
 *   h[index] += ((h[index]·downᵀ + bias) ⊙ mask)·up
 * where `iv.L.index` [K, 2] lists the (row, position) pairs edited on layer L (unique),
 * down/bias/up stack the low-rank factors of every intervention on layer L in the batch (rank
 * R in total) and mask[k, j] is the strength with which the intervention owning rank column j
 * applies at pair k (0 where it does not; 1 for a stored artifact as it is). The block sits in
 * an If on `has_interventions`, so a step without edits (every decode step) skips it.
 *
 * The edit's coefficients before the mask, h[index]·downᵀ + bias [K, R], are the output
 * `iv.L.coefficients` (empty on a step without edits), REFT.md's readout. Under a device cache
 * only the first `coefficient_rows` of them come back (0 unless a row asked), so a step that
 * edits but reports nothing downloads nothing more.
 */
export const DECODER_GRAPH_VERSION = 'decoder-v9';

/**
 * From this past capacity on, a host-cache decode step attends in plain operators rather than
 * GroupQueryAttention. Below it GQA's copies are small and its one kernel costs less than the
 * plain path's dozen (measured on 30 layers of the 135M shapes, one thread: GQA 1.5 ms and the
 * plain path 1.9-2.1 ms at 128 slots, 2.7 and 2.0 ms at 256, 10 and 5.3 ms at 1,024).
 */
export const DECODE_ATTENTION_MIN_CAPACITY = 256;

/**
 * Where the graph's caller keeps the KV cache:
 * - `host`: the graph returns only the new K/V rows (or packed qkv) for the host to append.
 * - `device`: GroupQueryAttention's `present_key.L` / `present_value.L` ([batch, kv_heads,
 *   max(past, total), head_dim], each row valid up to its own length) are outputs, meant to stay
 *   on the device and come back as the next step's past (as onnxruntime-genai feeds them). The
 *   graph also greedy-samples on the device: `next_token` (argmax of each logit row) and
 *   `next_logprob` (its log-probability), so a greedy step downloads ids, not logits.
 */
export type KvCacheSide = 'host' | 'device';

const OPSETS = { '': 21, [MS_DOMAIN]: 1 };

export const decoderInputs = {
  inputIds: 'input_ids',
  positionIds: 'position_ids',
  seqlensK: 'seqlens_k',
  totalSequenceLength: 'total_sequence_length',
  hasInterventions: 'has_interventions',
  /**
   * WebGPU only (matmul-attention.ts): [] bool, whether the run carries more than one token per
   * row, which then attends in plain operators instead of GroupQueryAttention.
   */
  multiToken: 'multi_token',
  logitIndex: 'logit_index',
  /** Device cache only: which logit rows come back to the host as `logits`. */
  hostLogitRows: 'host_logit_rows',
  /** Device cache only: [1] int64, how many rows of each layer's coefficients come back. */
  coefficientRows: 'coefficient_rows',
  pastKey: (l: number) => `past_key.${l}`,
  pastValue: (l: number) => `past_value.${l}`,
  ivIndex: (l: number) => `iv.${l}.index`,
  ivMask: (l: number) => `iv.${l}.mask`,
  ivDown: (l: number) => `iv.${l}.down`,
  ivBias: (l: number) => `iv.${l}.bias`,
  ivUp: (l: number) => `iv.${l}.up`,
};

export const decoderOutputs = {
  logits: 'logits',
  nextToken: 'next_token',
  nextLogprob: 'next_logprob',
  presentKey: (l: number) => `present_key.${l}`,
  presentValue: (l: number) => `present_value.${l}`,
  newKey: (l: number) => `new_key.${l}`,
  newValue: (l: number) => `new_value.${l}`,
  qkv: (l: number) => `qkv.${l}`,
  ivCoefficients: (l: number) => `iv.${l}.coefficients`,
};

export type AttentionLayout = 'packed' | 'separate';

/**
 * GroupQueryAttention rotates q and k itself only for head sizes that are multiples of 16, and
 * only straight from the projection (per-head q/k norms come between).
 */
export function defaultAttentionLayout(config: ModelConfig): AttentionLayout {
  return config.headDim % 16 === 0 && !config.layout.qkNorm ? 'packed' : 'separate';
}

/** With `quantized`, the graph reads that file's blocks instead of the checkpoint (projection-weights.ts). */
export function buildDecoderGraph(
  config: ModelConfig,
  checkpoint: Checkpoint,
  layout: AttentionLayout = defaultAttentionLayout(config),
  device: Device = 'cpu',
  cache: KvCacheSide = 'host',
  quantized: QuantizedCheckpoint | null = null,
): Uint8Array {
  const g = new GraphBuilder('reft_decoder');
  const inputs = {
    ids: g.input(decoderInputs.inputIds, 'int64', ['batch', 'seq']),
    positions: g.input(decoderInputs.positionIds, 'int64', ['batch', 'seq']),
    seqlensK: g.input(decoderInputs.seqlensK, 'int32', ['batch']),
    totalSeq: g.input(decoderInputs.totalSequenceLength, 'int32', []),
    logitIndex: g.input(decoderInputs.logitIndex, 'int64', ['logit_rows', 2]),
    hasInterventions: g.input(decoderInputs.hasInterventions, 'bool', []),
    multiToken: prefillsInPlainOperators(device) ? g.input(decoderInputs.multiToken, 'bool', []) : null,
    coefficientRows: cache === 'device' ? g.input(decoderInputs.coefficientRows, 'int64', [1]) : null,
  };
  const weights = quantized ? quantizedWeightSource(g, quantized) : floatWeightSource(g, checkpoint, device);
  const logits = decoderForward(inferenceOps(g, config, weights, layout, device, cache, inputs), config);
  if (cache === 'host') {
    g.output(logits, decoderOutputs.logits, 'float32', ['logit_rows', config.vocabSize]);
    return g.encode(OPSETS);
  }
  // Every output is fetched every run (the binding pre-allocates unfetched ones at their last
  // shape when some outputs stay on the device), so the logits the host needs are chosen by an
  // input: `host_logit_rows` of the logit rows, none on a greedy step.
  const hostRows = g.input(decoderInputs.hostLogitRows, 'int64', ['host_rows']);
  const hostLogits = g.op('Gather', [logits, hostRows], { axis: 0 }, { name: decoderOutputs.logits });
  g.output(hostLogits, hostLogits, 'float32', ['host_rows', config.vocabSize]);
  const token = g.op('ArgMax', [logits], { axis: -1, keepdims: 0 }, { name: decoderOutputs.nextToken });
  g.output(token, token, 'int64', ['logit_rows']);
  const vocabAxis = g.int64s('vocab_axis', [-1]);
  const best = g.op('ReduceMax', [logits, vocabAxis], { keepdims: 0 });
  const lse = g.op('ReduceLogSumExp', [logits, vocabAxis], { keepdims: 0 });
  const logprob = g.op('Sub', [best, lse], {}, { name: decoderOutputs.nextLogprob });
  g.output(logprob, logprob, 'float32', ['logit_rows']);
  return g.encode(OPSETS);
}

interface DecoderGraphInputs {
  ids: string;
  positions: string;
  seqlensK: string;
  totalSeq: string;
  logitIndex: string;
  hasInterventions: string;
  /** Under MatMulSoftmax prefill attention: the run's multi-token flag. */
  multiToken: string | null;
  /** Device cache: the coefficient rows to return; host: all of them. */
  coefficientRows: string | null;
}

/** The inference graph's operators: ORT's fused contrib operators, attention over the KV cache. */
function inferenceOps(
  g: GraphBuilder,
  config: ModelConfig,
  weights: WeightSource,
  layout: AttentionLayout,
  device: Device,
  cache: KvCacheSide,
  inputs: DecoderGraphInputs,
): ForwardOps {
  const { numHeads, numKvHeads, headDim, hiddenSize: d } = config;
  const kvDim = numKvHeads * headDim;
  const qDim = numHeads * headDim;
  const eps = float(config.rmsNormEps);
  const weight = weights.tensor;
  const normWeight = (name: string) => offsetWeight(g, weight(name), config.layout.normOffset);
  /** x·[W…]ᵀ (+ b) over [out, in] weights stacked along out; `name` names the result. */
  const project = (x: string, ws: string[], b: string | null, name?: string): string => {
    if (!b) return weights.project(x, ws, name);
    return g.op('Add', [weights.project(x, ws), b], {}, { name });
  };
  const linear = (x: string, w: LinearWeights, name?: string): string => project(x, [w.weight], w.bias ? weight(w.bias) : null, name);
  const norm = (x: string, w: string): string =>
    g.op('SimplifiedLayerNormalization', [x, normWeight(w)], { axis: -1, epsilon: eps, stash_type: 1 });
  /** RMSNorm of each head of a [batch, seq, heads·head_dim] projection. */
  const headNorm = (x: string, w: string): string => {
    const heads = g.op('Reshape', [x, g.int64s('head_view', [0, 0, -1, headDim])]);
    return g.op('Reshape', [norm(heads, w), g.int64s('flat_view', [0, 0, -1])]);
  };
  const { cos, sin } = rotaryTables(g, config);
  /** What every layer's decode attention shares, built once (host cache only). */
  let decodeValues: DecodeStepValues | null = null;
  const decodeStep = (): DecodeStepValues => (decodeValues ??= decodeStepValues(g, inputs.ids, inputs.seqlensK, decoderInputs.pastKey(0)));

  const attention = (x: string, layer: LayerSpec): string => {
    const l = layer.index;
    const pastKey = g.input(decoderInputs.pastKey(l), 'float32', ['batch', numKvHeads, 'past', headDim]);
    const pastValue = g.input(decoderInputs.pastValue(l), 'float32', ['batch', numKvHeads, 'past', headDim]);
    const { seqlensK, totalSeq } = inputs;
    const host = cache === 'host';
    const presentDims = ['batch', numKvHeads, 'present', headDim];
    /** GroupQueryAttention's node in `b` (the graph, or an If branch); outputs named by `outputs`. */
    const gqa = (b: GraphBuilder, gqaInputs: string[], rotary: Record<string, AttrValue>, outputs?: string[]): string[] =>
      b.opN(
        'GroupQueryAttention',
        gqaInputs,
        3,
        { num_heads: numHeads, kv_num_heads: numKvHeads, ...attentionAttributes(config, layer), ...rotary },
        { domain: MS_DOMAIN, outputs },
      );
    /**
     * The layer's attention, from the inputs GroupQueryAttention takes (`gqaInputs`) or the
     * rotated q, k, v at some positions (`tokens`, for the plain-operator branches):
     * - host cache on the CPU: an If on a decode step over a long past, which attends in plain
     *   operators reading the past in place (decodeAttention: GQA's CPU kernel would zero and copy
     *   the whole past of every layer into a present the host drops), else GroupQueryAttention;
     * - WebGPU (MatMulSoftmax): an If on the multi-token flag, whose runs of several tokens attend
     *   in plain operators (matmul-attention.ts) and decode steps with GroupQueryAttention;
     * - else GroupQueryAttention. Under a device cache its presents are the graph's outputs.
     */
    const attend = (
      gqaInputs: string[],
      rotary: Record<string, AttrValue>,
      tokens: (b: GraphBuilder, positions: string) => DecodeTokens,
    ): string => {
      const names = host ? [`attention.${l}`] : [`attention.${l}`, decoderOutputs.presentKey(l), decoderOutputs.presentValue(l)];
      /** An If branch whose results are named as its outputs (no Identity copies a present). */
      const branch = (name: string, results: (b: GraphBuilder, outputs: string[]) => void) => {
        const b = new GraphBuilder(`${name}_${l}`, `${name}_${l}/`);
        const outputs = names.map((n) => `${name}_${l}/${n}`);
        results(b, outputs);
        outputs.forEach((o, i) => b.output(o, o, 'float32', i ? presentDims : ['batch', 'seq', qDim]));
        return subgraph(b);
      };
      // under a host cache the presents are not the branch's outputs (nor anyone's)
      const unused = [decoderOutputs.presentKey(l), decoderOutputs.presentValue(l)].map((n) => `group_query_attention_${l}/unused.${n}`);
      const fused = () =>
        branch('group_query_attention', (b, outputs) => gqa(b, gqaInputs, rotary, host ? [outputs[0], ...unused] : outputs));
      let out: string;
      if (host && device === 'cpu') {
        const step = new GraphBuilder(`decode_attention_${l}`, `decode_attention_${l}/`);
        const one = decodeOver(step, tokens(step, decodeStep().positions));
        step.output(one, one, 'float32', ['batch', 1, qDim]);
        out = g.opN('If', [decodeStep().isDecode], 1, { then_branch: subgraph(step), else_branch: fused() }, { outputs: names })[0];
      } else if (inputs.multiToken) {
        const plain = branch('matmul_attention', (b, [out, presentKey, presentValue]) =>
          matmulAttention(b, config, layer, { ...tokens(b, inputs.positions), ...past }, { out, presentKey, presentValue }),
        );
        out = g.opN('If', [inputs.multiToken], names.length, { then_branch: plain, else_branch: fused() }, { outputs: names })[0];
      } else {
        out = gqa(g, gqaInputs, rotary, host ? undefined : names)[0];
      }
      if (!host) {
        g.output(decoderOutputs.presentKey(l), decoderOutputs.presentKey(l), 'float32', presentDims);
        g.output(decoderOutputs.presentValue(l), decoderOutputs.presentValue(l), 'float32', presentDims);
      }
      return out;
    };
    const past = { pastKey, pastValue, seqlensK };
    const decodeOver = (b: GraphBuilder, t: DecodeTokens): string =>
      decodeAttention(b, config, t, {
        pastKey,
        pastValue,
        mask: decodeStep().mask(layer.slidingWindow),
        probsSplit: decodeStep().probsSplit,
      });
    if (layout === 'packed') {
      if (layer.qNorm) throw new Error('graph builder: the packed attention layout has no per-head q/k norms; use separate');
      const parts = [layer.q, layer.k, layer.v];
      const bias = layer.q.bias
        ? g.op(
            'Concat',
            parts.map((w) => weight(w.bias!)),
            { axis: 0 },
          )
        : null;
      const qkv = project(
        x,
        parts.map((w) => w.weight),
        bias,
        host ? decoderOutputs.qkv(l) : undefined,
      );
      if (host) g.output(qkv, qkv, 'float32', ['batch', 'seq', qDim + 2 * kvDim]);
      // the plain branches split the projection and rotate q and k as GroupQueryAttention does
      const tokens = (b: GraphBuilder, positions: string): DecodeTokens => {
        const [q, k, v] = b.opN('Split', [qkv, b.int64s('qkv_split', [qDim, kvDim, kvDim])], 3, { axis: -1 });
        const rotate = (t: string, heads: number) =>
          b.op('RotaryEmbedding', [t, positions, cos, sin], { interleaved: 0, num_heads: heads }, { domain: MS_DOMAIN });
        return { q: rotate(q, numHeads), k: rotate(k, numKvHeads), v };
      };
      return attend([qkv, '', '', pastKey, pastValue, seqlensK, totalSeq, cos, sin], { do_rotary: 1, rotary_interleaved: 0 }, tokens);
    }
    const rotary = (t: string, heads: number, name?: string) =>
      g.op('RotaryEmbedding', [t, inputs.positions, cos, sin], { interleaved: 0, num_heads: heads }, { domain: MS_DOMAIN, name });
    const normed = (t: string, w: string | null) => (w ? headNorm(t, w) : t);
    const q = rotary(normed(linear(x, layer.q), layer.qNorm), numHeads);
    // K and V are graph outputs under their own names (an Identity would copy them).
    const k = rotary(normed(linear(x, layer.k), layer.kNorm), numKvHeads, host ? decoderOutputs.newKey(l) : undefined);
    const v = linear(x, layer.v, host ? decoderOutputs.newValue(l) : undefined);
    if (host) {
      g.output(k, k, 'float32', ['batch', 'seq', kvDim]);
      g.output(v, v, 'float32', ['batch', 'seq', kvDim]);
    }
    return attend([q, k, v, pastKey, pastValue, seqlensK, totalSeq], { do_rotary: 0 }, () => ({ q, k, v }));
  };

  return {
    embed: (w, scale) => {
      const h = weights.gather(w, inputs.ids);
      return scale === null ? h : g.op('Mul', [h, g.constant('embed_scale', Float32Array.of(scale), [])]);
    },
    norm,
    addNorm: (residual, x, w) => {
      const [normed, , , sum] = g.opN(
        'SkipSimplifiedLayerNormalization',
        [x, residual, normWeight(w)],
        4,
        { epsilon: eps },
        { domain: MS_DOMAIN },
      );
      return { sum, normed };
    },
    add: (a, b) => g.op('Add', [a, b]),
    linear: (x, w) => linear(x, w),
    attention,
    gatedActivation: (x, layer) => {
      // gate and up as one matmul over their stacked weights: one longer stream per layer
      const bias = layer.gate.bias ? g.op('Concat', [weight(layer.gate.bias), weight(layer.up.bias!)], { axis: 0 }) : null;
      const [gatePre, up] = g.opN('Split', [project(x, [layer.gate.weight, layer.up.weight], bias)], 2, {
        axis: -1,
        num_outputs: 2,
      });
      const gate =
        config.layout.activation === 'silu'
          ? g.op('QuickGelu', [gatePre], { alpha: float(1) }, { domain: MS_DOMAIN })
          : g.op('FastGelu', [gatePre], {}, { domain: MS_DOMAIN });
      return g.op('Mul', [gate, up]);
    },
    intervene: (h, l) => {
      const name = decoderOutputs.ivCoefficients(l);
      const [edited, coefficients] = interventionBlock(g, h, l, d, inputs.hasInterventions, inputs.coefficientRows ? `all.${name}` : name);
      const dims = [`coefficient_rows_${l}`, `coefficient_rank_${l}`];
      if (!inputs.coefficientRows) {
        g.output(coefficients, name, 'float32', dims);
        return edited;
      }
      const zero = g.int64s('zero', [0]);
      const returned = g.op('Slice', [coefficients, zero, inputs.coefficientRows, zero], {}, { name });
      g.output(returned, returned, 'float32', dims);
      return edited;
    },
    logitRows: (h) => g.op('GatherND', [h, inputs.logitIndex]),
    logits: (x, w, softcap) => {
      const name = cache === 'host' ? decoderOutputs.logits : undefined;
      if (softcap === null) return weights.vocabProject(x, w, name);
      return softcapOp(g, weights.vocabProject(x, w), softcap, name);
    },
  };
}

/** GroupQueryAttention's attributes for what the layout changes (none for Llama). */
function attentionAttributes(config: ModelConfig, layer: LayerSpec): Record<string, AttrValue> {
  const { attentionScale, attentionSoftcap } = config.layout;
  const attrs: Record<string, AttrValue> = {};
  if (attentionScale !== null) attrs.scale = float(attentionScale);
  if (attentionSoftcap !== null) attrs.softcap = float(attentionSoftcap);
  if (layer.slidingWindow !== null) attrs.local_window_size = layer.slidingWindow;
  return attrs;
}

interface DecodeStepValues {
  /** Whether the step runs one token a row over a past of DECODE_ATTENTION_MIN_CAPACITY or more (bool scalar). */
  isDecode: string;
  /** Each row's past length as [batch, 1] int64: the new token's position. */
  positions: string;
  /** The additive mask [batch, 1, 1, 1, capacity] of each row's past keys a new token sees. */
  mask: (window: number | null) => string;
  /** [capacity, 1]: splits the probabilities over the past and the new key. */
  probsSplit: string;
}

/**
 * The values every layer's decode attention shares. The past's capacity is read from layer 0's
 * past: the host feeds every layer's past at one capacity (one slab layout).
 */
function decodeStepValues(g: GraphBuilder, ids: string, seqlensK: string, pastKey0: string): DecodeStepValues {
  const scalar = (hint: string, v: number) => g.constant(hint, BigInt64Array.of(BigInt(v)), []);
  const seq = g.op('Shape', [ids], { start: 1, end: 2 });
  const capacityDim = g.op('Shape', [pastKey0], { start: 2, end: 3 });
  const capacity = g.op('Squeeze', [capacityDim]);
  const oneToken = g.op('Equal', [seq, g.int64s('one', [1])]);
  const longPast = g.op('GreaterOrEqual', [capacityDim, g.int64s('min_past', [DECODE_ATTENTION_MIN_CAPACITY])]);
  const isDecode = g.op('Squeeze', [g.op('And', [oneToken, longPast])]);
  const keys = g.op('Range', [scalar('zero', 0), capacity, scalar('one', 1)]); // [capacity]
  const positions = g.op('Unsqueeze', [g.op('Cast', [seqlensK], { to: ELEM.int64 }), g.int64s('axis_1', [1])]); // [batch, 1]
  const seen = g.op('Less', [keys, positions]);
  const zero = g.constant('zero', Float32Array.of(0), []);
  const hidden = g.constant('hidden', Float32Array.of(-Infinity), []);
  const masks = new Map<number | null, string>();
  const mask = (window: number | null): string => {
    let m = masks.get(window);
    if (m) return m;
    let visible = seen;
    if (window !== null) {
      // GroupQueryAttention's local_window_size: the query at position p sees the keys from
      // p - window + 1 on (its own among them)
      const first = g.op('Sub', [positions, g.int64s('window', [window - 1])]);
      visible = g.op('And', [seen, g.op('GreaterOrEqual', [keys, first])]);
    }
    m = g.op('Unsqueeze', [g.op('Where', [visible, zero, hidden]), g.int64s('axes_1_2_3', [1, 2, 3])]);
    masks.set(window, m);
    return m;
  };
  const probsSplit = g.op('Concat', [capacityDim, g.int64s('one', [1])], { axis: 0 });
  return { isDecode, positions, mask, probsSplit };
}

/** A decode step's new token per row, [batch, 1, heads·head_dim] each; q and k rotated. */
interface DecodeTokens {
  q: string;
  k: string;
  v: string;
}

/**
 * Attention of one new token a row over its past, in plain operators that read the past in
 * place: scores against the past keys [batch, kv_heads, capacity, head_dim] (masked past each
 * row's length, and outside a sliding window) and against the new key, one softmax over both,
 * and the weighted sum of the past values plus the new value's share. GroupQueryAttention
 * instead zeroes a present, copies the past into it once per q head, and reads it from there.
 *
 * Each q head is a product of its own (one row: [batch, kv_heads, group, 1, head_dim] against
 * the past viewed as [batch, kv_heads, 1, capacity, head_dim]), with the scale applied to q
 * beforehand: MLAS streams a one-row product's other side through its unpacked kernels only
 * when alpha is 1, and otherwise copies it into packed panels first (measured on 30 layers of
 * 4,032 past tokens, one thread: 18 ms this way, 36 ms as one 3-row product a KV head, 47 ms
 * GQA). Same scale, soft-cap and window as GQA.
 */
function decodeAttention(
  b: GraphBuilder,
  config: ModelConfig,
  t: DecodeTokens,
  past: { pastKey: string; pastValue: string; mask: string; probsSplit: string },
): string {
  const { numHeads, numKvHeads, headDim } = config;
  const { attentionSoftcap } = config.layout;
  const scale = b.constant('scale', Float32Array.of(attentionScale(config)), []);
  // one token a row: [batch, 1, heads·head_dim] is [batch, kv_heads, heads per kv head, 1, head_dim]
  const q = b.op('Reshape', [b.op('Mul', [t.q, scale]), b.int64s('q_heads', [-1, numKvHeads, numHeads / numKvHeads, 1, headDim])]);
  const kvHeads = b.int64s('kv_heads', [-1, numKvHeads, 1, 1, headDim]);
  const perHead = (x: string) => b.op('Unsqueeze', [x, b.int64s('group_axis', [2])]); // a view, no copy
  const score = (keys: string) => {
    const s = b.op('FusedMatMul', [q, keys], { transB: 1 }, { domain: MS_DOMAIN });
    return attentionSoftcap === null ? s : softcapOp(b, s, attentionSoftcap);
  };
  const pastScores = b.op('Add', [score(perHead(past.pastKey)), past.mask]);
  const scores = b.op('Concat', [pastScores, score(b.op('Reshape', [t.k, kvHeads]))], { axis: -1 });
  const probs = b.op('Softmax', [scores], { axis: -1 });
  const [pastProbs, newProbs] = b.opN('Split', [probs, past.probsSplit], 2, { axis: -1 });
  const newShare = b.op('Mul', [newProbs, b.op('Reshape', [t.v, kvHeads])]);
  const heads = b.op('Add', [b.op('MatMul', [pastProbs, perHead(past.pastValue)]), newShare]);
  return b.op('Reshape', [heads, b.int64s('flat', [-1, 1, numHeads * headDim])]);
}

/**
 * h[index] += ((h[index]·downᵀ + bias) ⊙ mask)·up on the [batch, seq, d] stream, inside an If so
 * that steps without interventions run none of it. Returns the edited stream and the
 * coefficients h[index]·downᵀ + bias [K, R] (an empty [0, 0] without interventions), named
 * `coefficientsName`.
 */
function interventionBlock(
  g: GraphBuilder,
  h: string,
  l: number,
  d: number,
  hasInterventions: string,
  coefficientsName: string,
): [string, string] {
  const index = g.input(decoderInputs.ivIndex(l), 'int64', [`iv_rows_${l}`, 2]);
  const mask = g.input(decoderInputs.ivMask(l), 'float32', [`iv_rows_${l}`, `iv_rank_${l}`]);
  const down = g.input(decoderInputs.ivDown(l), 'float32', [`iv_rank_${l}`, d]);
  const bias = g.input(decoderInputs.ivBias(l), 'float32', [`iv_rank_${l}`]);
  const up = g.input(decoderInputs.ivUp(l), 'float32', [`iv_rank_${l}`, d]);
  const coefficientDims = [`coefficient_rows_${l}`, `coefficient_rank_${l}`];
  const edit = new GraphBuilder(`intervene_${l}`, `intervene_${l}/`);
  const selected = edit.op('GatherND', [h, index]);
  const coefficients = edit.op('Gemm', [selected, down, bias], { transB: 1 });
  const u = edit.op('Mul', [coefficients, mask]);
  const edited = edit.op('ScatterND', [h, index, edit.op('MatMul', [u, up])], { reduction: 'add' });
  edit.output(edited, edited, 'float32', ['batch', 'seq', d]);
  edit.output(coefficients, coefficients, 'float32', coefficientDims);
  const keep = new GraphBuilder(`keep_${l}`, `keep_${l}/`);
  const same = keep.op('Identity', [h]);
  keep.output(same, same, 'float32', ['batch', 'seq', d]);
  const none = keep.op('Identity', [keep.constant('no_coefficients', new Float32Array(0), [0, 0])]);
  keep.output(none, none, 'float32', coefficientDims);
  const [out, coefs] = g.opN(
    'If',
    [hasInterventions],
    2,
    { then_branch: subgraph(edit), else_branch: subgraph(keep) },
    { outputs: [`intervened.${l}`, coefficientsName] },
  );
  return [out, coefs];
}

/** cos/sin tables [max_positions, head_dim/2] for ORT's rotary kernels. */
function rotaryTables(g: GraphBuilder, config: ModelConfig): { cos: string; sin: string } {
  const t = ropeTables(config);
  return { cos: g.constant('rope_cos', t.cos, [t.positions, t.half]), sin: g.constant('rope_sin', t.sin, [t.positions, t.half]) };
}
