import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { GraphBuilder, MS_DOMAIN, float, subgraph } from './onnx.ts';
import { ropeTables } from './rope.ts';
import { checkpointWeight } from './weights.ts';

/**
 * The inference graph of a Llama-family decoder, with ReFT interventions as inputs.
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
 * - `separate`: q, k, v projections, RotaryEmbedding on q and k, GQA without rotary; the graph
 *   returns the rotated `new_key.L` and `new_value.L` ([batch, seq, kv_heads·head_dim]).
 *
 * After decoder layer L, the interventions of the batch edit the residual stream:
 *   h[index] += ((h[index]·downᵀ + bias) ⊙ mask)·up
 * where `iv.L.index` [K, 2] lists the (row, position) pairs edited on layer L (unique),
 * down/bias/up stack the low-rank factors of every intervention on layer L in the batch (rank
 * R in total) and mask[k, j] = 1 when the intervention owning rank column j applies at pair k.
 * The block sits in an If on `has_interventions`, so a step without edits (every decode step)
 * skips it.
 */
export const DECODER_GRAPH_VERSION = 'decoder-v4';

const OPSETS = { '': 21, [MS_DOMAIN]: 1 };

export const decoderInputs = {
  inputIds: 'input_ids',
  positionIds: 'position_ids',
  seqlensK: 'seqlens_k',
  totalSequenceLength: 'total_sequence_length',
  hasInterventions: 'has_interventions',
  logitIndex: 'logit_index',
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
  newKey: (l: number) => `new_key.${l}`,
  newValue: (l: number) => `new_value.${l}`,
  qkv: (l: number) => `qkv.${l}`,
};

export type AttentionLayout = 'packed' | 'separate';

/** GroupQueryAttention rotates q and k itself only for head sizes that are multiples of 16. */
export function defaultAttentionLayout(config: ModelConfig): AttentionLayout {
  return config.headDim % 16 === 0 ? 'packed' : 'separate';
}

export function buildDecoderGraph(config: ModelConfig, checkpoint: Checkpoint, layout: AttentionLayout = defaultAttentionLayout(config)): Uint8Array {
  const g = new GraphBuilder('reft_decoder');
  const d = config.hiddenSize;
  const kvDim = config.numKvHeads * config.headDim;
  const qDim = config.numHeads * config.headDim;

  const weight = (name: string): string => checkpointWeight(g, checkpoint, name);
  /** x·Wᵀ (+ b) over an [out, in] weight; `name` names the result. Weights stacked with Concat
   * are folded into one initializer when the session loads. */
  const project = (x: string, w: string, b: string | null, name?: string): string => {
    if (!b) return g.op('FusedMatMul', [x, w], { transB: 1 }, { domain: MS_DOMAIN, name });
    return g.op('Add', [g.op('FusedMatMul', [x, w], { transB: 1 }, { domain: MS_DOMAIN }), b], {}, { name });
  };
  const linear = (x: string, prefix: string, bias: boolean, name?: string): string =>
    project(x, weight(`${prefix}.weight`), bias ? weight(`${prefix}.bias`) : null, name);
  const rmsNorm = (x: string, w: string): string =>
    g.op('SimplifiedLayerNormalization', [x, weight(w)], { axis: -1, epsilon: float(config.rmsNormEps), stash_type: 1 });

  const inputIds = g.input(decoderInputs.inputIds, 'int64', ['batch', 'seq']);
  const positionIds = g.input(decoderInputs.positionIds, 'int64', ['batch', 'seq']);
  const seqlensK = g.input(decoderInputs.seqlensK, 'int32', ['batch']);
  const totalSeq = g.input(decoderInputs.totalSequenceLength, 'int32', []);
  const logitIndex = g.input(decoderInputs.logitIndex, 'int64', ['logit_rows', 2]);
  const hasInterventions = g.input(decoderInputs.hasInterventions, 'bool', []);

  const { cos, sin } = rotaryTables(g, config);
  const embed = weight('model.embed_tokens.weight');
  let h = g.op('Gather', [embed, inputIds], { axis: 0 });

  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    const x = rmsNorm(h, `${p}.input_layernorm.weight`);
    const pastKey = g.input(decoderInputs.pastKey(l), 'float32', ['batch', config.numKvHeads, 'past', config.headDim]);
    const pastValue = g.input(decoderInputs.pastValue(l), 'float32', ['batch', config.numKvHeads, 'past', config.headDim]);
    const gqa = { num_heads: config.numHeads, kv_num_heads: config.numKvHeads };
    let attn: string;
    if (layout === 'packed') {
      const proj = (t: string) => ['q_proj', 'k_proj', 'v_proj'].map((m) => weight(`${p}.self_attn.${m}.${t}`));
      const concat = (t: string) => g.op('Concat', proj(t), { axis: 0 });
      const qkv = project(x, concat('weight'), config.attentionBias ? concat('bias') : null, decoderOutputs.qkv(l));
      g.output(qkv, qkv, 'float32', ['batch', 'seq', qDim + 2 * kvDim]);
      [attn] = g.opN('GroupQueryAttention', [qkv, '', '', pastKey, pastValue, seqlensK, totalSeq, cos, sin], 3, { ...gqa, do_rotary: 1, rotary_interleaved: 0 }, { domain: MS_DOMAIN });
    } else {
      const rotary = (t: string, heads: number, name?: string) =>
        g.op('RotaryEmbedding', [t, positionIds, cos, sin], { interleaved: 0, num_heads: heads }, { domain: MS_DOMAIN, name });
      const q = rotary(linear(x, `${p}.self_attn.q_proj`, config.attentionBias), config.numHeads);
      // K and V are graph outputs under their own names (an Identity would copy them).
      const k = rotary(linear(x, `${p}.self_attn.k_proj`, config.attentionBias), config.numKvHeads, decoderOutputs.newKey(l));
      const v = linear(x, `${p}.self_attn.v_proj`, config.attentionBias, decoderOutputs.newValue(l));
      g.output(k, k, 'float32', ['batch', 'seq', kvDim]);
      g.output(v, v, 'float32', ['batch', 'seq', kvDim]);
      [attn] = g.opN('GroupQueryAttention', [q, k, v, pastKey, pastValue, seqlensK, totalSeq], 3, { ...gqa, do_rotary: 0 }, { domain: MS_DOMAIN });
    }
    const o = linear(attn, `${p}.self_attn.o_proj`, false);
    const [x2, , , mid] = g.opN(
      'SkipSimplifiedLayerNormalization',
      [o, h, weight(`${p}.post_attention_layernorm.weight`)],
      4,
      { epsilon: float(config.rmsNormEps) },
      { domain: MS_DOMAIN },
    );
    // gate and up as one matmul over their stacked weights: one longer stream per layer
    const gateUp = (t: string) => g.op('Concat', ['gate_proj', 'up_proj'].map((m) => weight(`${p}.mlp.${m}.${t}`)), { axis: 0 });
    const [gatePre, up] = g.opN('Split', [project(x2, gateUp('weight'), config.mlpBias ? gateUp('bias') : null)], 2, { axis: -1, num_outputs: 2 });
    const gate = g.op('QuickGelu', [gatePre], { alpha: float(1) }, { domain: MS_DOMAIN });
    const down = linear(g.op('Mul', [gate, up]), `${p}.mlp.down_proj`, config.mlpBias);
    h = g.op('Add', [mid, down]);
    h = interventionBlock(g, h, l, d, hasInterventions);
  }

  const last = rmsNorm(g.op('GatherND', [h, logitIndex]), 'model.norm.weight');
  const lmHead = config.tieWordEmbeddings ? embed : weight('lm_head.weight');
  const logits = g.op('FusedMatMul', [last, lmHead], { transB: 1 }, { domain: MS_DOMAIN, name: decoderOutputs.logits });
  g.output(logits, logits, 'float32', ['logit_rows', config.vocabSize]);
  return g.encode(OPSETS);
}

/**
 * h[index] += ((h[index]·downᵀ + bias) ⊙ mask)·up on the [batch, seq, d] stream, inside an If so
 * that steps without interventions run none of it.
 */
function interventionBlock(g: GraphBuilder, h: string, l: number, d: number, hasInterventions: string): string {
  const index = g.input(decoderInputs.ivIndex(l), 'int64', [`iv_rows_${l}`, 2]);
  const mask = g.input(decoderInputs.ivMask(l), 'float32', [`iv_rows_${l}`, `iv_rank_${l}`]);
  const down = g.input(decoderInputs.ivDown(l), 'float32', [`iv_rank_${l}`, d]);
  const bias = g.input(decoderInputs.ivBias(l), 'float32', [`iv_rank_${l}`]);
  const up = g.input(decoderInputs.ivUp(l), 'float32', [`iv_rank_${l}`, d]);
  const edit = new GraphBuilder(`intervene_${l}`, `intervene_${l}/`);
  const selected = edit.op('GatherND', [h, index]);
  const u = edit.op('Mul', [edit.op('Gemm', [selected, down, bias], { transB: 1 }), mask]);
  const edited = edit.op('ScatterND', [h, index, edit.op('MatMul', [u, up])], { reduction: 'add' });
  edit.output(edited, edited, 'float32', ['batch', 'seq', d]);
  const keep = new GraphBuilder(`keep_${l}`, `keep_${l}/`);
  const same = keep.op('Identity', [h]);
  keep.output(same, same, 'float32', ['batch', 'seq', d]);
  return g.op('If', [hasInterventions], { then_branch: subgraph(edit), else_branch: subgraph(keep) });
}

/** cos/sin tables [max_positions, head_dim/2] for ORT's rotary kernels. */
function rotaryTables(g: GraphBuilder, config: ModelConfig): { cos: string; sin: string } {
  const t = ropeTables(config);
  return { cos: g.constant('rope_cos', t.cos, [t.positions, t.half]), sin: g.constant('rope_sin', t.sin, [t.positions, t.half]) };
}
