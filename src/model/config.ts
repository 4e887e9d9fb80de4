import { z } from 'zod';
import {
  architectureUnsupported,
  attentionHeadsMismatch,
  firstIssue,
  headDimUnsupported,
  modelConfigInvalid,
  ropeScalingUnsupported,
} from '../errors.ts';
import { SUPPORTED_ARCHITECTURES, decoderLayout, isArchitecture, type Architecture, type DecoderLayout } from './architecture.ts';

export { SUPPORTED_ARCHITECTURES, type Architecture } from './architecture.ts';

export type RopeScaling =
  | { type: 'linear'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

/** What the graph builder and engine need from config.json, normalised across architectures. */
export interface ModelConfig {
  architecture: Architecture;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositions: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling | null;
  tieWordEmbeddings: boolean;
  /** How the architecture's layers differ from Llama's (src/model/architecture.ts). */
  layout: DecoderLayout;
  bosTokenId: number | null;
  eosTokenIds: number[];
}

const tokenIds = z.union([z.number().int(), z.array(z.number().int())]).nullish();

const rawConfigSchema = z
  .object({
    architectures: z.array(z.string()).min(1),
    hidden_size: z.number().int().positive(),
    intermediate_size: z.number().int().positive(),
    num_hidden_layers: z.number().int().positive(),
    num_attention_heads: z.number().int().positive(),
    num_key_value_heads: z.number().int().positive().nullish(),
    head_dim: z.number().int().positive().nullish(),
    vocab_size: z.number().int().positive(),
    max_position_embeddings: z.number().int().positive(),
    rms_norm_eps: z.number().positive(),
    rope_theta: z.number().positive().default(10000),
    rope_scaling: z.record(z.string(), z.unknown()).nullish(),
    tie_word_embeddings: z.boolean().default(false),
    attention_bias: z.boolean().default(false),
    mlp_bias: z.boolean().default(false),
    bos_token_id: tokenIds,
    eos_token_id: tokenIds,
  })
  .passthrough();

function asList(v: number | number[] | null | undefined): number[] {
  if (v === null || v === undefined) return [];
  return Array.isArray(v) ? v : [v];
}

/** Parses config.json (plus generation_config.json, whose EOS ids extend the model's). */
export function parseModelConfig(raw: unknown, generationConfig: unknown = {}): ModelConfig {
  const parsed = rawConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const { field, message } = firstIssue(parsed.error);
    throw modelConfigInvalid({ field, problem: message }, field);
  }
  const c = parsed.data;
  const architecture = c.architectures[0];
  if (!isArchitecture(architecture)) {
    throw architectureUnsupported({ architecture, supported: SUPPORTED_ARCHITECTURES }, 'architectures');
  }
  const numKvHeads = c.num_key_value_heads ?? c.num_attention_heads;
  if (c.num_attention_heads % numKvHeads !== 0) {
    throw attentionHeadsMismatch({ heads: c.num_attention_heads, kvHeads: numKvHeads }, 'num_key_value_heads');
  }
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    throw headDimUnsupported({ headDim }, 'head_dim');
  }
  const gen = (generationConfig ?? {}) as { eos_token_id?: number | number[]; bos_token_id?: number };
  const eos = [...new Set([...asList(c.eos_token_id), ...asList(gen.eos_token_id)])];
  const bos = asList(c.bos_token_id)[0] ?? asList(gen.bos_token_id)[0] ?? null;
  return {
    architecture,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    vocabSize: c.vocab_size,
    maxPositions: c.max_position_embeddings,
    rmsNormEps: c.rms_norm_eps,
    ropeTheta: c.rope_theta,
    ropeScaling: parseRopeScaling(c.rope_scaling),
    tieWordEmbeddings: c.tie_word_embeddings,
    layout: decoderLayout(architecture, c),
    bosTokenId: bos,
    eosTokenIds: eos,
  };
}

function parseRopeScaling(raw: Record<string, unknown> | null | undefined): RopeScaling | null {
  if (!raw) return null;
  const type = (raw.rope_type ?? raw.type) as unknown;
  const num = (key: string): number => {
    const v = raw[key];
    if (typeof v !== 'number' || !(v > 0))
      throw modelConfigInvalid({ field: `rope_scaling.${key}`, problem: 'must be a positive number' }, `rope_scaling.${key}`);
    return v;
  };
  if (type === 'default') return null;
  if (type === 'linear') return { type: 'linear', factor: num('factor') };
  if (type === 'llama3') {
    return {
      type: 'llama3',
      factor: num('factor'),
      lowFreqFactor: num('low_freq_factor'),
      highFreqFactor: num('high_freq_factor'),
      originalMaxPositionEmbeddings: num('original_max_position_embeddings'),
    };
  }
  throw ropeScalingUnsupported({ type }, 'rope_scaling.rope_type');
}

/** The scale attention applies to q·k: the architecture's, else 1/√head_dim. */
export function attentionScale(config: ModelConfig): number {
  return config.layout.attentionScale ?? 1 / Math.sqrt(config.headDim);
}

/** Inverse frequencies of the rotary embedding, as transformers computes them (incl. scaling). */
export function ropeInverseFrequencies(config: ModelConfig): Float64Array {
  const half = config.headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / config.ropeTheta ** ((2 * i) / config.headDim);
  const s = config.ropeScaling;
  if (!s) return inv;
  if (s.type === 'linear') return inv.map((f) => f / s.factor);
  const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
  const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
  return inv.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highWavelen) return f;
    if (wavelen > lowWavelen) return f / s.factor;
    const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return (1 - smooth) * (f / s.factor) + smooth * f;
  });
}
