import type { WeightFormat } from '../quant/formats.ts';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Logger } from 'pino';
import { ReftError, interventionNameTaken, jobStepBudgetExceeded, jobTimeBudgetExceeded } from '../errors.ts';
import type { LoadedModel } from '../model/load.ts';
import type { Device } from '../runtime/session.ts';
import type { Job, Lease, Store } from '../storage/store.ts';
import { utcDay } from '../storage/usage.ts';
import { Trainer, decodeCheckpoint, encodeCheckpoint, type TrainingProgress } from '../training/index.ts';
import { jobRows, tokenizeTrainingRowsYielding } from './data.ts';
import type { JobSpec } from './spec.ts';

/**
 * The training worker's loop: claim a queued job (or one whose lease expired), train it with a
 * lease kept alive by heartbeats, checkpoint as it goes, and register the result as the
 * tenant's intervention. A worker killed mid-job leaves a lease that expires; the next claim
 * resumes from the last checkpoint.
 */
export interface RunnerOptions {
  store: Store;
  model: LoadedModel;
  log: Logger;
  leaseMs: number;
  maxAttempts: number;
  /** How often to look for work when nothing wakes the worker. */
  pollMs: number;
  checkpointMs: number;
  budget: { maxSteps: number; maxSeconds: number };
  /** Bytes one forward + backward pass may hold (--train-memory-budget). */
  trainMemoryBudget?: number;
  device?: Device;
  threads?: number;
  cacheDir?: string;
  /** The frozen base's weights (--weights): f32, or q8/q4 quantized blocks. */
  weights?: WeightFormat;
}

/** Why a running job's training was stopped before its last step. */
type StopReason = 'cancel' | 'shutdown' | 'lease';

/** Events are throttled so a long job doesn't write a row per step. */
const EVENT_INTERVAL_MS = 500;

export class JobRunner {
  readonly workerId = `${hostname()}:${process.pid}:${randomBytes(3).toString('hex')}`;
  private stopping = false;
  private wake: (() => void) | null = null;
  private current: AbortController | null = null;

  constructor(private readonly o: RunnerOptions) {}

  /** Claims and runs jobs until `stop` is called. */
  async run(): Promise<void> {
    const unsubscribe = this.o.store.onJobQueued(() => this.wake?.());
    this.o.log.info({ worker: this.workerId }, 'training worker ready');
    try {
      while (!this.stopping) {
        let claimed: { job: Job; lease: Lease } | null = null;
        try {
          claimed = await this.o.store.claimJob(this.workerId, this.o.leaseMs, this.o.maxAttempts);
        } catch (err) {
          this.o.log.warn({ err: (err as Error).message }, 'could not claim a job; retrying');
        }
        if (claimed) await this.runJob(claimed.job);
        else await this.idle();
      }
    } finally {
      unsubscribe();
    }
  }

  private idle(): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, this.o.pollMs);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    });
  }

  /** Stops after the current step; the job's lease is handed back so another worker resumes at once. */
  stop(): void {
    this.stopping = true;
    this.current?.abort('shutdown' satisfies StopReason);
    this.wake?.();
  }

  private async runJob(job: Job): Promise<void> {
    const { store, log } = this.o;
    const spec = job.spec as JobSpec;
    const jobLog = log.child({ job: job.id, tenant: job.tenantId, attempt: job.attempts });
    const controller = new AbortController();
    this.current = controller;
    const heartbeat = setInterval(
      () => {
        store.renewLease(job.id, this.workerId, this.o.leaseMs).then(
          (held) => {
            if (!held && !controller.signal.aborted) {
              jobLog.warn('lease lost (another worker took the job); stopping');
              controller.abort('lease' satisfies StopReason);
            }
          },
          (err) => jobLog.warn({ err: (err as Error).message }, 'lease renewal failed'),
        );
      },
      Math.max(200, Math.floor(this.o.leaseMs / 3)),
    );
    const stopReason = () => (controller.signal.aborted ? (controller.signal.reason as StopReason) : null);
    try {
      const outcome = await this.train(job, spec, controller, jobLog);
      if (outcome.kind === 'done') {
        await store.finishJob(job.id, this.workerId, { status: 'succeeded', interventionId: outcome.interventionId });
        jobLog.info({ intervention: outcome.interventionId }, 'job succeeded');
        return;
      }
      switch (stopReason()) {
        case 'cancel':
          await store.finishJob(job.id, this.workerId, { status: 'cancelled' });
          jobLog.info({ step: outcome.step }, 'job cancelled');
          return;
        case 'shutdown':
          await store.renewLease(job.id, this.workerId, 0); // hand the job back now, not after the lease
          jobLog.info({ step: outcome.step }, 'worker stopping; job handed back');
          return;
        default:
          return; // the lease went to another worker, which owns the job now
      }
    } catch (err) {
      if (stopReason() === 'lease') return;
      // a typed error says what was wrong with the job; anything else stays in this log
      const reason =
        err instanceof ReftError && err.category !== 'internal'
          ? err.message
          : `internal error (worker ${this.workerId}, job ${job.id}: see the worker log)`;
      if (err instanceof ReftError && err.category === 'unavailable') {
        jobLog.warn({ reason }, 'store unavailable; the job will be retried when its lease expires');
        return;
      }
      jobLog.error({ err }, 'job failed');
      await store.finishJob(job.id, this.workerId, { status: 'failed', error: reason }).catch(() => {});
    } finally {
      clearInterval(heartbeat);
      this.current = null;
    }
  }

  private async train(
    job: Job,
    spec: JobSpec,
    controller: AbortController,
    log: Logger,
  ): Promise<{ kind: 'done'; interventionId: string } | { kind: 'stopped'; step: number }> {
    const { store, model } = this.o;
    const name = spec.name ?? `job-${job.id.replace(/^job_/, '')}`;
    const existing = await store.findIntervention(job.tenantId, name);
    if (existing && existing.tenantId === job.tenantId) {
      // A previous attempt registered the result and died before finishing the job.
      if ((existing.config as { metadata?: Record<string, string> })?.metadata?.job_id === job.id)
        return { kind: 'done', interventionId: existing.id };
      throw interventionNameTaken({ name }, 'name');
    }
    const rows = await jobRows(store, job.tenantId, spec.data);
    let examples;
    try {
      examples = await tokenizeTrainingRowsYielding(rows, model.tokenizer, model.config.maxPositions, controller.signal);
    } catch (e) {
      if (controller.signal.aborted) return { kind: 'stopped', step: 0 }; // cancel, shutdown or lost lease while tokenizing
      throw e;
    }
    const saved = await store.loadCheckpoint(job.id);
    let trainedTokens = 0;
    let lastEvent = 0;
    let lastCheckpoint = performance.now();
    const startedAt = job.startedAt ? Date.parse(job.startedAt) : Date.now();
    const trainer = await Trainer.fromExamples(model, spec.recipe, examples, {
      resumeFrom: saved ? decodeCheckpoint(saved.state) : undefined,
      signal: controller.signal,
      device: this.o.device,
      weights: this.o.weights,
      threads: this.o.threads,
      cacheDir: this.o.cacheDir,
      memoryBudget: this.o.trainMemoryBudget,
      artifact: { name, description: spec.description ?? undefined, metadata: { job_id: job.id } },
      onProgress: async (p: TrainingProgress) => {
        trainedTokens = Math.round(p.tokensPerSecond * p.elapsedSeconds);
        const fresh = await store.getJob(null, job.id);
        if (fresh?.cancelRequested && !controller.signal.aborted) controller.abort('cancel' satisfies StopReason);
        if ((Date.now() - startedAt) / 1000 > this.o.budget.maxSeconds) {
          throw jobTimeBudgetExceeded({ seconds: this.o.budget.maxSeconds, step: p.step });
        }
        const now = performance.now();
        if (now - lastEvent >= EVENT_INTERVAL_MS || p.step === p.totalSteps || p.step === 1) {
          lastEvent = now;
          const progress = progressOf(p);
          await store.updateProgress(job.id, this.workerId, progress);
          await store.appendJobEvent(job.id, 'metrics', progress);
        }
        if (now - lastCheckpoint >= this.o.checkpointMs && p.step < p.totalSteps) {
          lastCheckpoint = now;
          await store.saveCheckpoint(job.id, this.workerId, p.step, encodeCheckpoint(trainer.checkpoint()));
        }
      },
    });
    try {
      if (trainer.totalSteps > this.o.budget.maxSteps) {
        throw jobStepBudgetExceeded({ steps: trainer.totalSteps, limit: this.o.budget.maxSteps });
      }
      log.info(
        { steps: trainer.totalSteps, resumedAt: trainer.step, examples: examples.length },
        saved ? 'job resumed from checkpoint' : 'job started',
      );
      await store.appendJobEvent(job.id, 'log', {
        message: saved
          ? `resumed at step ${trainer.step} of ${trainer.totalSteps}`
          : `training ${trainer.totalSteps} steps on ${examples.length} examples`,
      });
      const outcome = await trainer.train().finally(() => this.recordTrainingTokens(job, trainedTokens));
      if (outcome.status === 'cancelled') {
        // a shutdown keeps the work done so far for whoever resumes the job
        if (controller.signal.reason === 'shutdown')
          await store.saveCheckpoint(job.id, this.workerId, outcome.steps, encodeCheckpoint(outcome.checkpoint));
        return { kind: 'stopped', step: outcome.steps };
      }
      const meta = await store.putIntervention({
        tenantId: job.tenantId,
        name,
        description: spec.description,
        source: 'training',
        config: outcome.artifact.parsed.config,
        files: { config: new TextEncoder().encode(outcome.artifact.configJson), weights: outcome.artifact.weights },
      });
      return { kind: 'done', interventionId: meta.id };
    } finally {
      await trainer.release();
    }
  }

  /** Training counts in the tenant's usage whatever the outcome (a retry counts its own run). */
  private async recordTrainingTokens(job: Job, tokens: number): Promise<void> {
    if (tokens <= 0) return;
    await this.o.store
      .recordUsage([{ tenantId: job.tenantId, day: utcDay(), requests: 0, promptTokens: 0, completionTokens: 0, trainingTokens: tokens }])
      .catch((err) => this.o.log.warn({ job: job.id, err: (err as Error).message }, 'training usage not recorded'));
  }
}

function progressOf(p: TrainingProgress) {
  return {
    step: p.step,
    total_steps: p.totalSteps,
    epoch: Math.round(p.epoch * 1000) / 1000,
    loss: p.loss,
    learning_rate: p.learningRate,
    micro_batches: p.microBatches,
    tokens_per_second: Math.round(p.tokensPerSecond),
    elapsed_seconds: Math.round(p.elapsedSeconds * 10) / 10,
    eta_seconds: Math.round(p.etaSeconds * 10) / 10,
  };
}
