import { MODEL_WEIGHTS, layerSpec, type LayerSpec, type LinearWeights } from '../model/architecture.ts';
import type { ModelConfig } from '../model/config.ts';

/**
 * The operators a decoder's forward pass is written in. The inference graph implements them
 * with ORT's fused contrib operators over a KV cache (decoder.ts), the training graph with
 * differentiable ai.onnx operators (training-graph.ts): each operator is chosen once per graph,
 * and that is where a device's or a weight format's operators would be chosen too.
 * Values are graph value names; weights are checkpoint tensor names.
 */
export interface ForwardOps {
  /** Token embeddings, times `scale` when it is set. */
  embed(weight: string, scale: number | null): string;
  /** RMSNorm over the last axis, times (layout.normOffset + weight). */
  norm(x: string, weight: string): string;
  /** residual + x, and the norm of that sum. */
  addNorm(residual: string, x: string, weight: string): { sum: string; normed: string };
  add(a: string, b: string): string;
  /** x·Wᵀ (+ b). */
  linear(x: string, w: LinearWeights): string;
  /**
   * The layer's self-attention over its normed input, up to the output projection: q/k/v
   * projections, per-head q/k norms, rotary embedding, scaled (soft-capped, windowed) attention.
   */
  attention(x: string, layer: LayerSpec): string;
  /** act(x·gateᵀ) ⊙ (x·upᵀ), the MLP before its down projection. */
  gatedActivation(x: string, layer: LayerSpec): string;
  /** The residual stream after layer l, with the interventions' edits. */
  intervene(h: string, l: number): string;
  /** The rows of the residual stream whose logits are wanted. */
  logitRows(h: string): string;
  /** x·Wᵀ over the vocabulary, then cap·tanh(logits / cap) when `softcap` is set. */
  logits(x: string, weight: string, softcap: number | null): string;
}

/**
 * The decoder's forward pass, written once for every architecture: what differs between them
 * is read from the config's layout and layer specs (src/model/architecture.ts). Returns the
 * logits of the rows `logitRows` picks.
 */
export function decoderForward(ops: ForwardOps, config: ModelConfig): string {
  const { layout } = config;
  let h = ops.embed(MODEL_WEIGHTS.embed, layout.embeddingScale);
  let x = ops.norm(h, layerSpec(config, 0).attnNorm);
  for (let l = 0; l < config.numLayers; l++) {
    const layer = layerSpec(config, l);
    let attn = ops.linear(ops.attention(x, layer), layer.o);
    if (layer.attnOutNorm) attn = ops.norm(attn, layer.attnOutNorm);
    const mid = ops.addNorm(h, attn, layer.mlpNorm);
    let mlp = ops.linear(ops.gatedActivation(mid.normed, layer), layer.down);
    if (layer.mlpOutNorm) mlp = ops.norm(mlp, layer.mlpOutNorm);
    h = ops.intervene(ops.add(mid.sum, mlp), l);
    if (l + 1 < config.numLayers) x = ops.norm(h, layerSpec(config, l + 1).attnNorm);
  }
  const final = ops.norm(ops.logitRows(h), MODEL_WEIGHTS.finalNorm);
  return ops.logits(final, config.tieWordEmbeddings ? MODEL_WEIGHTS.embed : MODEL_WEIGHTS.lmHead, layout.finalLogitSoftcap);
}
