import * as ort from 'onnxruntime-node';
import { decoderInputs as IN } from '../graph/decoder.ts';
import type { ModelConfig } from '../model/config.ts';
import { promptEmpty, promptTooLong, tokenOutOfVocabulary } from '../errors.ts';
import type { LayerInterventionFeed } from './intervention-feeds.ts';

/** The decoder graph's per-step inputs, built the same for the host and the device KV cache. */
/**
 * A step's token inputs: ids and positions [b, seq], each row's seqlens_k (its last valid
 * position), the total length, and the (row, position) pairs whose logits are wanted.
 */
export function tokenFeeds(
  b: number,
  seq: number,
  t: { ids: BigInt64Array; positions: BigInt64Array; seqlens: Int32Array; total: number; logitPairs: BigInt64Array },
): Record<string, ort.Tensor> {
  return {
    [IN.inputIds]: new ort.Tensor('int64', t.ids, [b, seq]),
    [IN.positionIds]: new ort.Tensor('int64', t.positions, [b, seq]),
    [IN.seqlensK]: new ort.Tensor('int32', t.seqlens, [b]),
    [IN.totalSequenceLength]: new ort.Tensor('int32', Int32Array.of(t.total), []),
    [IN.logitIndex]: new ort.Tensor('int64', t.logitPairs, [t.logitPairs.length / 2, 2]),
  };
}

export function concatFloats(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function toTensors(feeds: LayerInterventionFeed[], d: number): Record<string, ort.Tensor> {
  const out: Record<string, ort.Tensor> = {};
  feeds.forEach((f, l) => {
    out[IN.ivIndex(l)] = new ort.Tensor('int64', f.index, [f.k, 2]);
    out[IN.ivMask(l)] = new ort.Tensor('float32', f.mask, [f.k, f.r]);
    out[IN.ivDown(l)] = new ort.Tensor('float32', f.down, [f.r, d]);
    out[IN.ivBias(l)] = new ort.Tensor('float32', f.bias, [f.r]);
    out[IN.ivUp(l)] = new ort.Tensor('float32', f.up, [f.r, d]);
  });
  return out;
}

export function emptyInterventionFeeds(config: ModelConfig): Record<string, ort.Tensor> {
  const empty = {
    index: new BigInt64Array(0),
    mask: new Float32Array(0),
    down: new Float32Array(0),
    bias: new Float32Array(0),
    up: new Float32Array(0),
    k: 0,
    r: 0,
    readout: [],
  };
  return {
    ...toTensors(
      Array.from({ length: config.numLayers }, () => empty),
      config.hiddenSize,
    ),
    [IN.hasInterventions]: new ort.Tensor('bool', Uint8Array.of(0), []),
  };
}

/** Sets a step's intervention inputs and the flag that lets a step without edits skip them. */
export function setInterventions(feeds: Record<string, ort.Tensor>, layerFeeds: LayerInterventionFeed[], d: number): void {
  Object.assign(feeds, toTensors(layerFeeds, d));
  feeds[IN.hasInterventions] = new ort.Tensor('bool', Uint8Array.of(layerFeeds.some((f) => f.k > 0) ? 1 : 0), []);
}

/**
 * A prompt either engine can run: some tokens, each in the vocabulary (ORT's CPU Gather fails on
 * an id outside it with an untyped error; a GPU's kernel need not check), within the context.
 */
export function checkPrompt(config: ModelConfig, tokens: readonly number[], field: string): void {
  if (tokens.length === 0) throw promptEmpty({}, field);
  const bad = tokens.find((t) => !Number.isInteger(t) || t < 0 || t >= config.vocabSize);
  if (bad !== undefined) throw tokenOutOfVocabulary({ field, id: bad, vocabSize: config.vocabSize }, field);
  if (tokens.length > config.maxPositions) throw promptTooLong({ tokens: tokens.length, context: config.maxPositions }, 'prompt');
}
