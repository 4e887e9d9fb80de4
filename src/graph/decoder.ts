import type { Device } from '../runtime/session.ts';
import type { LayerSpec, LinearWeights } from '../model/architecture.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { decoderForward, type ForwardOps } from './forward.ts';
import { GraphBuilder, MS_DOMAIN, float, subgraph, type AttrValue } from './onnx.ts';
import type { QuantizedCheckpoint } from '../quant/cache.ts';
import { matmulAttention, prefillAttention, type AttentionValues } from './matmul-attention.ts';
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
export const DECODER_GRAPH_VERSION = 'decoder-v7';

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
    multiToken: prefillAttention(device) === 'MatMulSoftmax' ? g.input(decoderInputs.multiToken, 'bool', []) : null,
    coefficientRows: cache === 'device' ? g.input(decoderInputs.coefficientRows, 'int64', [1]) : null,
  };
  const weights = quantized ? quantizedWeightSource(g, quantized) : floatWeightSource(g, checkpoint, device);
  const logits = decoderForward(inferenceOps(g, config, weights, layout, cache, inputs), config);
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
     * The layer's attention: GroupQueryAttention, or (MatMulSoftmax) an If on the multi-token
     * flag whose branches attend in plain operators (`multi`, from q, k, v rotated) or with
     * GroupQueryAttention. Under a device cache its presents are the graph's outputs.
     */
    const attend = (gqaInputs: string[], rotary: Record<string, AttrValue>, multi: (b: GraphBuilder) => AttentionValues): string => {
      const names = host ? [`attention.${l}`] : [`attention.${l}`, decoderOutputs.presentKey(l), decoderOutputs.presentValue(l)];
      let out: string;
      if (!inputs.multiToken) {
        out = gqa(g, gqaInputs, rotary, host ? undefined : names)[0];
      } else {
        /** An If branch whose results are named as its outputs (no Identity copies a present). */
        const branch = (name: string, results: (b: GraphBuilder, outputs: string[]) => void) => {
          const b = new GraphBuilder(`${name}_${l}`, `${name}_${l}/`);
          const outputs = names.map((n) => `${name}_${l}/${n}`);
          results(b, outputs);
          outputs.forEach((o, i) => b.output(o, o, 'float32', i ? presentDims : ['batch', 'seq', qDim]));
          return subgraph(b);
        };
        const plain = branch('matmul_attention', (b, [out, presentKey, presentValue]) =>
          matmulAttention(b, config, layer, multi(b), { out, presentKey, presentValue }),
        );
        // under a host cache the presents are not the branch's outputs (nor anyone's)
        const unused = [decoderOutputs.presentKey(l), decoderOutputs.presentValue(l)].map((n) => `group_query_attention_${l}/unused.${n}`);
        const fused = branch('group_query_attention', (b, outputs) => gqa(b, gqaInputs, rotary, host ? [outputs[0], ...unused] : outputs));
        out = g.opN('If', [inputs.multiToken], names.length, { then_branch: plain, else_branch: fused }, { outputs: names })[0];
      }
      if (!host) {
        g.output(decoderOutputs.presentKey(l), decoderOutputs.presentKey(l), 'float32', presentDims);
        g.output(decoderOutputs.presentValue(l), decoderOutputs.presentValue(l), 'float32', presentDims);
      }
      return out;
    };
    const past = { pastKey, pastValue, seqlensK };
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
      // the plain branch splits the projection and rotates q and k as GroupQueryAttention does
      const multi = (b: GraphBuilder): AttentionValues => {
        const [q, k, v] = b.opN('Split', [qkv, b.int64s('qkv_split', [qDim, kvDim, kvDim])], 3, { axis: -1 });
        const rotate = (t: string, heads: number) =>
          b.op('RotaryEmbedding', [t, inputs.positions, cos, sin], { interleaved: 0, num_heads: heads }, { domain: MS_DOMAIN });
        return { q: rotate(q, numHeads), k: rotate(k, numKvHeads), v, ...past };
      };
      return attend([qkv, '', '', pastKey, pastValue, seqlensK, totalSeq, cos, sin], { do_rotary: 1, rotary_interleaved: 0 }, multi);
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
    return attend([q, k, v, pastKey, pastValue, seqlensK, totalSeq], { do_rotary: 0 }, () => ({ q, k, v, ...past }));
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

/** cap·tanh(x / cap) in plain operators. */
function softcapOp(g: GraphBuilder, x: string, cap: number, name?: string): string {
  const scaled = g.op('Tanh', [g.op('Div', [x, g.constant('softcap', Float32Array.of(cap), [])])]);
  return g.op('Mul', [scaled, g.constant('softcap', Float32Array.of(cap), [])], {}, { name });
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
