import { checkpointMismatch, trainingDataEmpty, trainingRowInvalid } from '../errors.ts';
import { KIND_TENSORS, lowRank, type InterventionSpec, type LowRankIntervention } from '../interventions/artifact.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import { accumulateGradients } from './accumulate.ts';
import { StackLayout, allocateFactors, type LayerFactors, type TrainingExample } from './batch.ts';
import { dataFingerprint, type TrainingCheckpoint } from './checkpoint.ts';
import { tokenizeRows, type TrainingRow } from './data.ts';
import { hasRotation, initialTensors, writeLowRank, type KindTensors } from './kinds.ts';
import { adamwStep, clipGradNorm, learningRate, type AdamMoments, type AdamWSettings } from './optimizer.ts';
import { DEFAULT_TRAIN_MEMORY_BUDGET, checkRowFits, planMicroBatches } from './memory.ts';
import { retractRows } from './orthogonal.ts';
import { buildArtifact, type ArtifactInfo, type TrainedArtifact } from './output.ts';
import { interventionSpecs, parseRecipe, type Recipe, type RecipeInput } from './recipe.ts';
import { Rng } from '../rng.ts';
import { StepSession, type StepSessionOptions } from './step-session.ts';

/**
 * Trains ReFT interventions on a frozen model: pyreft's initialisation, Hugging Face Trainer's
 * loop (shuffled epochs, gradient accumulation with the loss averaged over every completion
 * token of the accumulated batches, global-norm clipping, AdamW, linear/cosine schedule with
 * warmup), LoReFT's R kept orthonormal by a QR retraction after each step, and a checkpoint
 * that resumes bit for bit.
 */
export interface TrainingProgress {
  /** Optimizer steps done (1 after the first). */
  step: number;
  totalSteps: number;
  /** Fractional epochs done. */
  epoch: number;
  /** Mean loss over the completion tokens of this step's batches (before the update). */
  loss: number;
  learningRate: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Forward/backward passes of this step: the accumulated batches, each split to fit the memory budget. */
  microBatches: number;
  /** Tokens (prompt and completion) processed per second since this run (or resume) began. */
  tokensPerSecond: number;
  elapsedSeconds: number;
  etaSeconds: number;
}

export type TrainingOutcome =
  | { status: 'completed'; steps: number; loss: number; artifact: TrainedArtifact }
  | { status: 'cancelled'; steps: number; checkpoint: TrainingCheckpoint };

export interface TrainerOptions extends StepSessionOptions {
  /** Called after every optimizer step and awaited (a job checks for cancellation here). */
  onProgress?: (p: TrainingProgress) => unknown;
  /** Checked before every optimizer step; an aborted run returns a checkpoint to resume from. */
  signal?: AbortSignal;
  /** Hands a checkpoint to `onCheckpoint` every this many optimizer steps. */
  checkpointEvery?: number;
  onCheckpoint?: (c: TrainingCheckpoint) => void | Promise<void>;
  /** Continue a job from its checkpoint (same recipe and data). */
  resumeFrom?: TrainingCheckpoint;
  /** name / description / metadata of the produced artifact. */
  artifact?: ArtifactInfo;
  /** Bytes one forward + backward pass may hold (see memory.ts); batches are split to stay under it. */
  memoryBudget?: number;
}

export interface TrainerModel {
  config: ModelConfig;
  checkpoint: Checkpoint;
  tokenizer?: TextTokenizer;
}

export class Trainer {
  readonly totalSteps: number;
  readonly stepsPerEpoch: number;
  private readonly layout: StackLayout;
  private readonly factors: LayerFactors;
  private readonly params: KindTensors[];
  private readonly moments: Array<Record<string, AdamMoments>>;
  private readonly grads: KindTensors[];
  private readonly adam: AdamWSettings;
  private readonly microBatches: number;
  private readonly fingerprint: string;
  private dropoutRng: Rng;
  private stepsDone = 0;
  private epochOrder: { epoch: number; order: number[] } | null = null;

  private constructor(
    private readonly config: ModelConfig,
    readonly recipe: Recipe,
    readonly specs: InterventionSpec[],
    readonly examples: readonly TrainingExample[],
    private readonly graph: StepSession,
    private readonly opts: TrainerOptions,
  ) {
    const d = config.hiddenSize;
    this.layout = new StackLayout(this.specs);
    this.factors = allocateFactors(this.layout, d);
    this.microBatches = Math.ceil(examples.length / recipe.batch_size);
    this.stepsPerEpoch = Math.ceil(this.microBatches / recipe.gradient_accumulation_steps);
    this.totalSteps = recipe.max_steps ?? recipe.epochs * this.stepsPerEpoch;
    this.fingerprint = dataFingerprint(examples);
    this.adam = { beta1: recipe.adam_beta1, beta2: recipe.adam_beta2, eps: recipe.adam_epsilon, weightDecay: recipe.weight_decay };

    const initRng = new Rng(recipe.seed);
    this.params = this.specs.map((s) => initialTensors(s.kind, s.rank, d, initRng));
    this.moments = this.params.map((t) => mapTensors(t, (v) => ({ m: new Float32Array(v.length), v: new Float32Array(v.length) })));
    this.grads = this.params.map((t) => mapTensors(t, (v) => new Float32Array(v.length)));
    this.dropoutRng = new Rng((recipe.seed ^ 0x5bd1e995) >>> 0);
    if (opts.resumeFrom) this.restore(opts.resumeFrom);
    this.writeFactors();
  }

  /** A trainer over text rows, tokenized with the model's tokenizer. */
  static async create(
    model: TrainerModel,
    recipe: RecipeInput | Recipe,
    rows: readonly TrainingRow[],
    opts: TrainerOptions = {},
  ): Promise<Trainer> {
    if (!model.tokenizer) throw new Error('Trainer.create needs the model tokenizer; use fromExamples for token ids');
    return Trainer.fromExamples(model, recipe, tokenizeRows(rows, model.tokenizer, model.config.maxPositions), opts);
  }

  /** A trainer over already tokenized examples. */
  static async fromExamples(
    model: TrainerModel,
    recipeInput: RecipeInput | Recipe,
    examples: readonly TrainingExample[],
    opts: TrainerOptions = {},
  ): Promise<Trainer> {
    const recipe = parseRecipe(recipeInput, model.config);
    checkExamples(examples, model.config);
    const longest = examples.reduce((n, e) => Math.max(n, e.tokens.length), 0);
    checkRowFits(model.config, longest, opts.memoryBudget ?? DEFAULT_TRAIN_MEMORY_BUDGET);
    const specs = interventionSpecs(recipe, model.config);
    const graph = await StepSession.create(
      model.config,
      model.checkpoint,
      specs.map((s) => s.layer),
      opts,
    );
    return new Trainer(model.config, recipe, specs, examples, graph, opts);
  }

  get step(): number {
    return this.stepsDone;
  }

  /** Runs the remaining steps (all of them, or until cancelled). */
  async train(): Promise<TrainingOutcome> {
    const { signal, onProgress, checkpointEvery, onCheckpoint } = this.opts;
    const started = performance.now();
    const firstStep = this.stepsDone;
    let tokens = 0;
    let loss = NaN;
    while (this.stepsDone < this.totalSteps) {
      if (signal?.aborted) return { status: 'cancelled', steps: this.stepsDone, checkpoint: this.checkpoint() };
      const lr = learningRate(this.recipe, this.stepsDone, this.totalSteps);
      const result = await this.optimizerStep(lr);
      loss = result.loss;
      tokens += result.tokens;
      if (onProgress) {
        const elapsed = (performance.now() - started) / 1000;
        const done = this.stepsDone - firstStep;
        await onProgress({
          step: this.stepsDone,
          totalSteps: this.totalSteps,
          epoch: this.stepsDone / this.stepsPerEpoch,
          loss,
          learningRate: lr,
          gradNorm: result.gradNorm,
          microBatches: result.microBatches,
          tokensPerSecond: tokens / Math.max(elapsed, 1e-9),
          elapsedSeconds: elapsed,
          etaSeconds: (elapsed / done) * (this.totalSteps - this.stepsDone),
        });
      }
      if (checkpointEvery && onCheckpoint && this.stepsDone % checkpointEvery === 0 && this.stepsDone < this.totalSteps) {
        await onCheckpoint(this.checkpoint());
      }
    }
    return { status: 'completed', steps: this.stepsDone, loss, artifact: this.artifact() };
  }

  /** The current state, to resume from with `resumeFrom` (copies: training may go on). */
  checkpoint(): TrainingCheckpoint {
    const epoch = Math.floor(this.stepsDone / this.stepsPerEpoch);
    return {
      step: this.stepsDone,
      totalSteps: this.totalSteps,
      recipe: this.recipe,
      dataFingerprint: this.fingerprint,
      rngState: this.dropoutRng.state,
      epoch,
      order: [...this.orderOf(epoch)],
      specs: this.specs,
      params: this.params.map((t) => mapTensors(t, (v) => v.slice())),
      moments: this.moments.map((t) => mapTensors(t, (m) => ({ m: m.m.slice(), v: m.v.slice() }))),
    };
  }

  /** The interventions as they are now, as reft/v1 files. */
  artifact(): TrainedArtifact {
    return buildArtifact(this.specs, this.params, this.config, this.opts.artifact);
  }

  /** The interventions as they are now, in the engine's form (for evaluation while training). */
  interventions(): LowRankIntervention[] {
    return this.specs.map((s, i) =>
      lowRank(
        s,
        mapTensors(this.params[i], (v) => v.slice()),
        this.config.hiddenSize,
      ),
    );
  }

  async release(): Promise<void> {
    await this.graph.release();
  }

  /** One optimizer step over the step's micro-batches. */
  private async optimizerStep(lr: number): Promise<{ loss: number; gradNorm: number; tokens: number; microBatches: number }> {
    const d = this.config.hiddenSize;
    // the token-weighted mean makes a split batch train exactly as the whole one (up to rounding)
    const budget = this.opts.memoryBudget ?? DEFAULT_TRAIN_MEMORY_BUDGET;
    const micro = this.microBatchesOf(this.stepsDone).flatMap((idx) =>
      planMicroBatches(this.config, idx, (i) => this.examples[i].tokens.length, budget),
    );
    // pyreft's ConsreftIntervention has no dropout; every other kind drops the edited rows
    const dropout =
      this.recipe.dropout > 0 && this.recipe.kind !== 'consreft' ? { p: this.recipe.dropout, rng: this.dropoutRng } : undefined;
    const step = { graph: this.graph, specs: this.specs, layout: this.layout, factors: this.factors, hiddenSize: d };
    const passes = micro.map((indices) => indices.map((i) => this.examples[i]));
    const { loss, tokens } = await accumulateGradients(step, passes, this.grads, dropout);
    const gradNorm = clipGradNorm(
      this.grads.flatMap((t) => Object.values(t)),
      this.recipe.max_grad_norm,
    );
    const t = this.stepsDone + 1;
    this.specs.forEach((s, i) => {
      for (const name of KIND_TENSORS[s.kind]) {
        // Trainer excludes biases from weight decay
        adamwStep(this.params[i][name], this.grads[i][name], this.moments[i][name], t, lr, this.adam, name !== 'source.bias');
      }
      if (hasRotation(s.kind)) retractRows(this.params[i].rotate, s.rank, d);
    });
    this.stepsDone++;
    this.writeFactors();
    return { loss, gradNorm, tokens, microBatches: micro.length };
  }

  /** Example indices of each micro-batch of optimizer step `step`. */
  private microBatchesOf(step: number): number[][] {
    const { batch_size: bs, gradient_accumulation_steps: accum } = this.recipe;
    const epoch = Math.floor(step / this.stepsPerEpoch);
    const order = this.orderOf(epoch);
    const first = (step % this.stepsPerEpoch) * accum;
    const last = Math.min(first + accum, this.microBatches);
    const out: number[][] = [];
    for (let m = first; m < last; m++) out.push(order.slice(m * bs, (m + 1) * bs));
    return out;
  }

  /** Each epoch's shuffle is its own stream, a function of (seed, epoch). */
  private orderOf(epoch: number): number[] {
    if (this.epochOrder?.epoch !== epoch) {
      const rng = new Rng((this.recipe.seed + Math.imul(epoch + 1, 0x9e3779b1)) >>> 0);
      this.epochOrder = { epoch, order: rng.permutation(this.examples.length) };
    }
    return this.epochOrder.order;
  }

  private writeFactors(): void {
    this.specs.forEach((s, i) =>
      writeLowRank(s.kind, this.params[i], s.rank, this.config.hiddenSize, this.layout.slotOf(i).offset, this.factors.get(s.layer)!),
    );
  }

  private restore(c: TrainingCheckpoint): void {
    if (JSON.stringify(c.recipe) !== JSON.stringify(this.recipe))
      throw checkpointMismatch({ problem: 'was taken with a different recipe' }, 'resume_from');
    if (c.dataFingerprint !== this.fingerprint)
      throw checkpointMismatch({ problem: 'was taken on different training data' }, 'resume_from');
    if (c.totalSteps !== this.totalSteps || c.step > this.totalSteps)
      throw checkpointMismatch({ problem: 'does not belong to this job' }, 'resume_from');
    this.stepsDone = c.step;
    this.dropoutRng = Rng.fromState(c.rngState);
    this.epochOrder = { epoch: c.epoch, order: [...c.order] };
    c.params.forEach((t, i) => {
      for (const [name, v] of Object.entries(t)) {
        this.params[i][name].set(v);
        this.moments[i][name].m.set(c.moments[i][name].m);
        this.moments[i][name].v.set(c.moments[i][name].v);
      }
    });
  }
}

function checkExamples(examples: readonly TrainingExample[], config: ModelConfig): void {
  if (examples.length === 0) throw trainingDataEmpty({ what: 'training data' }, 'data');
  examples.forEach((e, i) => {
    const field = `data.${i}`;
    if (!(e.promptLength >= 1 && e.promptLength < e.tokens.length))
      throw trainingRowInvalid({ at: field, problem: 'needs at least one prompt and one completion token' }, field);
    if (e.tokens.length > config.maxPositions)
      throw trainingRowInvalid(
        { at: field, problem: `${e.tokens.length} tokens exceed the model's context of ${config.maxPositions}` },
        field,
      );
    if (!e.tokens.every((t) => Number.isInteger(t) && t >= 0 && t < config.vocabSize))
      throw trainingRowInvalid({ at: field, problem: `token ids must be integers below ${config.vocabSize}` }, field);
  });
}

function mapTensors<S, T>(t: Record<string, S>, f: (v: S) => T): Record<string, T> {
  return Object.fromEntries(Object.entries(t).map(([k, v]) => [k, f(v)]));
}
