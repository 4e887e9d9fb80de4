import { z } from 'zod';
import { activationUnsupported, firstIssue, modelConfigInvalid } from '../errors.ts';

/**
 * What distinguishes one decoder architecture from another, as plain data on the model's
 * config: the checkpoint loader (which tensors to expect), the inference graph and the
 * training graph all read it, and nothing else names an architecture.
 * An architecture is a declaration over the Llama base (ARCHITECTURES, below): the weight
 * names it stores and how its config.json fills in this layout.
 */
export interface DecoderLayout {
  /** q/k/v projections carry a bias (Qwen2, or Llama with attention_bias). */
  attentionBias: boolean;
  mlpBias: boolean;
  /** RMSNorm over each head of q and k before the rotary embedding (Qwen3). */
  qkNorm: boolean;
  /** Norms multiply by (offset + w): 1 where checkpoints store w − 1 (Gemma). */
  normOffset: number;
  /** RMSNorm on the attention and MLP outputs too, before each joins the residual (Gemma 2). */
  sandwichNorms: boolean;
  /** Embeddings are multiplied by this (Gemma: √hidden); null for none. */
  embeddingScale: number | null;
  /** The MLP's gate activation: silu, or gelu's tanh approximation. */
  activation: 'silu' | 'gelu_tanh';
  /** Attention scores' scale; null for 1/√head_dim. */
  attentionScale: number | null;
  /** Attention scores become cap·tanh(s / cap) before the mask (Gemma 2); null for none. */
  attentionSoftcap: number | null;
  /** Final logits become cap·tanh(l / cap) (Gemma 2); null for none. */
  finalLogitSoftcap: number | null;
  /** Per layer, how many positions a query sees (itself included), or null for all. */
  slidingWindows: Array<number | null>;
}

/** Where each weight of a layer sits in the checkpoint (prefix `model.layers.L.`). */
export interface LayerWeightNames {
  attnNorm: string;
  q: string;
  k: string;
  v: string;
  o: string;
  qNorm: string;
  kNorm: string;
  /** The norm on the attention output (sandwich norms only). */
  attnOutNorm: string;
  mlpNorm: string;
  gate: string;
  up: string;
  down: string;
  /** The norm on the MLP output (sandwich norms only). */
  mlpOutNorm: string;
}

/** A projection x·Wᵀ (+ b): checkpoint names of its weight and bias. */
export interface LinearWeights {
  weight: string;
  bias: string | null;
}

/** One decoder layer, every name resolved: what the builders and the loader read. */
export interface LayerSpec {
  index: number;
  attnNorm: string;
  q: LinearWeights;
  k: LinearWeights;
  v: LinearWeights;
  o: LinearWeights;
  qNorm: string | null;
  kNorm: string | null;
  attnOutNorm: string | null;
  mlpNorm: string;
  gate: LinearWeights;
  up: LinearWeights;
  down: LinearWeights;
  mlpOutNorm: string | null;
  slidingWindow: number | null;
}

/** The common config.json fields an architecture's declaration may read. */
export type RawConfig = Record<string, unknown> & {
  hidden_size: number;
  num_hidden_layers: number;
  attention_bias: boolean;
  mlp_bias: boolean;
};

interface ArchitectureDeclaration {
  layerWeights: LayerWeightNames;
  /** This architecture's layout from its config.json. */
  layout(raw: RawConfig): DecoderLayout;
}

const LLAMA_WEIGHTS: LayerWeightNames = {
  attnNorm: 'input_layernorm',
  q: 'self_attn.q_proj',
  k: 'self_attn.k_proj',
  v: 'self_attn.v_proj',
  o: 'self_attn.o_proj',
  qNorm: 'self_attn.q_norm',
  kNorm: 'self_attn.k_norm',
  attnOutNorm: 'post_attention_layernorm',
  mlpNorm: 'post_attention_layernorm',
  gate: 'mlp.gate_proj',
  up: 'mlp.up_proj',
  down: 'mlp.down_proj',
  mlpOutNorm: 'post_feedforward_layernorm',
};

/** Parses an architecture's own config.json fields; a bad one is refused by name. */
function extraFields<T extends z.ZodRawShape>(raw: RawConfig, shape: T): z.infer<z.ZodObject<T>> {
  const parsed = z.object(shape).safeParse(raw);
  if (!parsed.success) {
    const { field, message } = firstIssue(parsed.error);
    throw modelConfigInvalid({ field, problem: message }, field);
  }
  return parsed.data;
}

/** The activation config.json names in `field` (`fallback` when it names none). */
function activation(raw: RawConfig, field: string, fallback: string): DecoderLayout['activation'] {
  const name = extraFields(raw, { [field]: z.string().nullish() })[field] ?? fallback;
  if (name === 'silu') return 'silu';
  if (name === 'gelu_pytorch_tanh' || name === 'gelu_new') return 'gelu_tanh';
  throw activationUnsupported({ field, name }, field);
}

/** The Llama layout, which every declaration starts from. */
const llamaLayout = (raw: RawConfig, act = activation(raw, 'hidden_act', 'silu')): DecoderLayout => ({
  attentionBias: raw.attention_bias,
  mlpBias: raw.mlp_bias,
  qkNorm: false,
  normOffset: 0,
  sandwichNorms: false,
  embeddingScale: null,
  activation: act,
  attentionScale: null,
  attentionSoftcap: null,
  finalLogitSoftcap: null,
  slidingWindows: Array.from({ length: raw.num_hidden_layers }, () => null),
});

const llama: ArchitectureDeclaration = { layerWeights: LLAMA_WEIGHTS, layout: llamaLayout };

const qwen2: ArchitectureDeclaration = { ...llama, layout: (raw) => ({ ...llamaLayout(raw), attentionBias: true }) };

const qwen3: ArchitectureDeclaration = { ...llama, layout: (raw) => ({ ...llamaLayout(raw), qkNorm: true }) };

const positive = z.number().positive();

/** Gemma 2: the post-attention norm is on the attention output, the MLP has its own pair. */
const gemma2: ArchitectureDeclaration = {
  layerWeights: { ...LLAMA_WEIGHTS, mlpNorm: 'pre_feedforward_layernorm' },
  layout: (raw) => {
    const c = extraFields(raw, {
      query_pre_attn_scalar: positive.nullish(),
      attn_logit_softcapping: positive.nullish(),
      final_logit_softcapping: positive.nullish(),
      sliding_window: z.number().int().positive().nullish(),
      layer_types: z
        .array(z.enum(['sliding_attention', 'full_attention']))
        .length(raw.num_hidden_layers)
        .nullish(),
    });
    // newer configs list each layer's kind; otherwise even layers slide (transformers' is_sliding)
    const sliding = (l: number) => (c.layer_types ? c.layer_types[l] === 'sliding_attention' : l % 2 === 0);
    // transformers reads hidden_activation, falling back to hidden_act
    const act =
      raw.hidden_activation != null ? activation(raw, 'hidden_activation', '') : activation(raw, 'hidden_act', 'gelu_pytorch_tanh');
    return {
      ...llamaLayout(raw, act),
      normOffset: 1,
      sandwichNorms: true,
      embeddingScale: Math.sqrt(raw.hidden_size),
      attentionScale: c.query_pre_attn_scalar ? 1 / Math.sqrt(c.query_pre_attn_scalar) : null,
      attentionSoftcap: c.attn_logit_softcapping ?? null,
      finalLogitSoftcap: c.final_logit_softcapping ?? null,
      slidingWindows: Array.from({ length: raw.num_hidden_layers }, (_, l) => (sliding(l) ? (c.sliding_window ?? null) : null)),
    };
  },
};

/** The architectures the builders know, by config.json's `architectures[0]`. */
export const ARCHITECTURES = {
  LlamaForCausalLM: llama,
  MistralForCausalLM: llama,
  Qwen2ForCausalLM: qwen2,
  Qwen3ForCausalLM: qwen3,
  Gemma2ForCausalLM: gemma2,
} satisfies Record<string, ArchitectureDeclaration>;

export type Architecture = keyof typeof ARCHITECTURES;
export const SUPPORTED_ARCHITECTURES = Object.keys(ARCHITECTURES) as Architecture[];

export function isArchitecture(name: string): name is Architecture {
  return Object.hasOwn(ARCHITECTURES, name);
}

export function decoderLayout(architecture: Architecture, raw: RawConfig): DecoderLayout {
  return ARCHITECTURES[architecture].layout(raw);
}

/** What a layout needs to resolve a layer: the architecture and its layout. */
interface LayoutOwner {
  architecture: Architecture;
  layout: DecoderLayout;
}

/** Layer l's weights by checkpoint name, and its attention window. */
export function layerSpec(config: LayoutOwner, l: number): LayerSpec {
  const names = ARCHITECTURES[config.architecture].layerWeights;
  const { layout } = config;
  const at = (n: string) => `model.layers.${l}.${n}`;
  const linear = (n: string, bias: boolean): LinearWeights => ({ weight: `${at(n)}.weight`, bias: bias ? `${at(n)}.bias` : null });
  const norm = (n: string, present: boolean) => (present ? `${at(n)}.weight` : null);
  return {
    index: l,
    attnNorm: `${at(names.attnNorm)}.weight`,
    q: linear(names.q, layout.attentionBias),
    k: linear(names.k, layout.attentionBias),
    v: linear(names.v, layout.attentionBias),
    o: linear(names.o, false),
    qNorm: norm(names.qNorm, layout.qkNorm),
    kNorm: norm(names.kNorm, layout.qkNorm),
    attnOutNorm: norm(names.attnOutNorm, layout.sandwichNorms),
    mlpNorm: `${at(names.mlpNorm)}.weight`,
    gate: linear(names.gate, layout.mlpBias),
    up: linear(names.up, layout.mlpBias),
    down: linear(names.down, layout.mlpBias),
    mlpOutNorm: norm(names.mlpOutNorm, layout.sandwichNorms),
    slidingWindow: layout.slidingWindows[l] ?? null,
  };
}

/** Weights outside the layers (the same names in every supported architecture). */
export const MODEL_WEIGHTS = {
  embed: 'model.embed_tokens.weight',
  finalNorm: 'model.norm.weight',
  lmHead: 'lm_head.weight',
};
