import * as ort from 'onnxruntime-node';
import { createSession, type SessionOptions } from '../runtime/session.ts';
import { cachedGraph } from '../graph/cache.ts';
import { trainingOperators } from '../graph/training-operators.ts';
import { QUANTIZED_GRAPH_VERSION } from '../graph/projection-weights.ts';
import { loadWeights, type WeightsChoice } from '../quant/load.ts';
import { TRAINING_GRAPH_VERSION, buildTrainingGraph, trainingInputs as IN, trainingOutputs as OUT } from '../graph/training-graph.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';

/** One layer's stacked low-rank factors (or their gradients), R rank columns in all. */
export interface LowRankFactors {
  down: Float32Array; // [R, d]
  bias: Float32Array; // [R]
  up: Float32Array; // [R, d]
}

/** One intervened layer's inputs for a batch (see buildTrainingGraph). */
export interface LayerTrainingFeed extends LowRankFactors {
  rows: BigInt64Array; // [K] flattened token indices, unique
  mask: Float32Array; // [K, R]
  dropout: Float32Array; // [K, d]
}

/** A padded batch: every [B, S] array is row-major, padding on the right. */
export interface TrainingBatch {
  batch: number;
  seq: number;
  inputIds: BigInt64Array;
  attentionMask: BigInt64Array;
  positionIds: BigInt64Array;
  targets: BigInt64Array;
  lossMask: Float32Array;
  /** One feed per layer the graph was built for. */
  layers: ReadonlyMap<number, LayerTrainingFeed>;
}

export interface TrainingResult {
  loss: number;
  grads: Map<number, LowRankFactors>;
}

const SINGLE_THREAD_HIDDEN = 256;

export interface StepSessionOptions extends SessionOptions {
  /** Where built graphs are cached (skip to build in memory every time; needed for quantized weights). */
  cacheDir?: string;
  /** The frozen base's weights: the checkpoint's floats (default) or quantized (QLoRA-style). */
  weights?: WeightsChoice;
}

/**
 * Runs the training graph: one session for the whole job, fed a batch per call, returning
 * the mean loss over the batch's completion tokens and its gradient for each layer's stacked
 * low-rank factors.
 */
export class StepSession {
  private readonly gradFetches: string[];

  private constructor(
    readonly config: ModelConfig,
    readonly layers: readonly number[],
    private readonly session: ort.InferenceSession,
  ) {
    this.gradFetches = [OUT.loss, ...layers.flatMap((l) => [OUT.gradDown(l), OUT.gradBias(l), OUT.gradUp(l)])];
  }

  static async create(
    config: ModelConfig,
    checkpoint: Checkpoint,
    layers: readonly number[],
    opts: StepSessionOptions = {},
  ): Promise<StepSession> {
    const sorted = [...new Set(layers)].sort((a, b) => a - b);
    const device = opts.device ?? 'cpu';
    const weights = opts.weights ?? 'f32';
    if (weights !== 'f32' && !opts.cacheDir) throw new Error('StepSession: quantized weights need a cacheDir');
    const { quantized } = opts.cacheDir ? await loadWeights(config, checkpoint, weights, opts.cacheDir) : { quantized: null };
    const build = () => buildTrainingGraph(config, checkpoint, sorted, device, quantized);
    const key = {
      version: TRAINING_GRAPH_VERSION,
      config,
      weights: checkpoint.fingerprint,
      layers: sorted,
      operators: trainingOperators(device),
    };
    const bytes = opts.cacheDir
      ? (await cachedGraph(opts.cacheDir, quantized ? { ...key, quantized: quantized.key, graph: QUANTIZED_GRAPH_VERSION } : key, build))
          .bytes
      : build();
    // A tiny model's ops are microseconds long: waking a second thread costs more than it saves
    // (stories260k: 1.1 vs 1.9 ms per step measured), so small models default to one thread.
    const threads = opts.threads ?? (config.hiddenSize <= SINGLE_THREAD_HIDDEN ? 1 : undefined);
    const session = await createSession(bytes, quantized?.dir ?? checkpoint.dataDir, { ...opts, threads });
    return new StepSession(config, sorted, session);
  }

  /** Loss and gradients. */
  async run(batch: TrainingBatch): Promise<TrainingResult> {
    if (!scoresAnything(batch)) return this.nothingScored(batch);
    const out = await this.session.run(this.feeds(batch), this.gradFetches);
    const grads = new Map<number, LowRankFactors>();
    for (const l of this.layers) {
      grads.set(l, {
        down: out[OUT.gradDown(l)].data as Float32Array,
        bias: out[OUT.gradBias(l)].data as Float32Array,
        up: out[OUT.gradUp(l)].data as Float32Array,
      });
    }
    return { loss: (out[OUT.loss].data as Float32Array)[0], grads };
  }

  /** The loss alone (ORT runs only the nodes the fetched output needs). */
  async loss(batch: TrainingBatch): Promise<number> {
    if (!scoresAnything(batch)) return 0;
    const out = await this.session.run(this.feeds(batch), [OUT.loss]);
    return (out[OUT.loss].data as Float32Array)[0];
  }

  async release(): Promise<void> {
    await this.session.release();
  }

  /**
   * A batch with no completion token has loss 0 and zero gradients; it is answered without a
   * pass, since reductions over the empty set of scored tokens fail on WebGPU.
   */
  private nothingScored(b: TrainingBatch): TrainingResult {
    const d = this.config.hiddenSize;
    const grads = new Map<number, LowRankFactors>();
    for (const l of this.layers) {
      const r = b.layers.get(l)?.bias.length ?? 0;
      grads.set(l, { down: new Float32Array(r * d), bias: new Float32Array(r), up: new Float32Array(r * d) });
    }
    return { loss: 0, grads };
  }

  private feeds(b: TrainingBatch): Record<string, ort.Tensor> {
    const dims = [b.batch, b.seq];
    const feeds: Record<string, ort.Tensor> = {
      [IN.inputIds]: new ort.Tensor('int64', b.inputIds, dims),
      [IN.attentionMask]: new ort.Tensor('float32', Float32Array.from(b.attentionMask, Number), dims),
      [IN.positionIds]: new ort.Tensor('int64', b.positionIds, dims),
      ...scoredFeeds(b),
    };
    const d = this.config.hiddenSize;
    for (const l of this.layers) {
      const f = b.layers.get(l);
      if (!f) throw new Error(`training batch has no feed for layer ${l}`);
      const k = f.rows.length;
      const r = f.bias.length;
      feeds[IN.ivRows(l)] = new ort.Tensor('int64', f.rows, [k, 1]);
      feeds[IN.ivMask(l)] = new ort.Tensor('float32', f.mask, [k, r]);
      feeds[IN.ivDown(l)] = new ort.Tensor('float32', f.down, [r, d]);
      feeds[IN.ivBias(l)] = new ort.Tensor('float32', f.bias, [r]);
      feeds[IN.ivUp(l)] = new ort.Tensor('float32', f.up, [r, d]);
      feeds[IN.ivDropout(l)] = new ort.Tensor('float32', f.dropout, [k, d]);
    }
    return feeds;
  }
}

const scoresAnything = (b: TrainingBatch): boolean => b.lossMask.some((w) => w !== 0);

/** The scored tokens (loss mask ≠ 0) as the graph takes them: flat indices, next tokens, weights. */
function scoredFeeds(b: TrainingBatch): Record<string, ort.Tensor> {
  const at: number[] = [];
  b.lossMask.forEach((w, i) => {
    if (w !== 0) at.push(i);
  });
  const m = at.length;
  return {
    [IN.scored]: new ort.Tensor('int64', BigInt64Array.from(at, BigInt), [m, 1]),
    [IN.scoredTargets]: new ort.Tensor(
      'int64',
      BigInt64Array.from(at, (i) => b.targets[i]),
      [m, 1],
    ),
    [IN.scoredWeights]: new ort.Tensor(
      'float32',
      Float32Array.from(at, (i) => b.lossMask[i]),
      [m, 1],
    ),
  };
}
