import { ReftError, deviceKvBudgetExceeded, queueFull, tokensInFlightExceeded } from '../errors.ts';
import type { PrefillInput, SequenceId } from './engine.ts';
import type { StepExecutor, StepSample } from './executor.ts';
import {
  Generation,
  checkPromptFits,
  type Detokenizer,
  type GenerationRequest,
  type GenerationResult,
  type TokenEvent,
} from './generation.ts';

/**
 * Continuous batching. Requests wait in a bounded queue, in which tenants take turns (the
 * oldest request of the tenant admitted longest ago goes next; first come first served within a
 * tenant); between engine steps, newcomers that fit the batch and token budgets are prefilled together (each with its own
 * interventions), and every running sequence then advances by one decode step. A prompt longer
 * than the engine's prefill chunk is prefilled one chunk per step instead, so the running
 * sequences keep decoding meanwhile. Finished or cancelled sequences leave at the next step
 * boundary.
 */
export interface SchedulerLimits {
  maxBatchSize: number;
  /** Bound on Σ (prompt + max_new_tokens) over running sequences: the KV cache's worst case. */
  maxTokensInFlight: number;
  /** Requests waiting beyond this are refused (503) instead of growing memory. */
  maxQueue: number;
  /** Prompt tokens prefilled in one step, so a burst of long prompts doesn't stall decoding. */
  maxPrefillTokens: number;
}

export const DEFAULT_LIMITS: SchedulerLimits = { maxBatchSize: 32, maxTokensInFlight: 65536, maxQueue: 256, maxPrefillTokens: 4096 };

export interface GenerationSink {
  onToken(event: TokenEvent): void;
  onDone(result: GenerationResult): void;
  onError(error: ReftError): void;
}

interface Entry {
  key: string;
  generation: Generation;
  sink: GenerationSink;
  seq?: SequenceId;
  budget: number;
  /** Counted in tokensInFlight (from admission until release). */
  admitted: boolean;
}

export interface SchedulerStats {
  queued: number;
  running: number;
  tokensInFlight: number;
  steps: number;
  lastBatchSize: number;
}

export class Scheduler {
  private readonly queue: Entry[] = [];
  private readonly running = new Map<SequenceId, Entry>();
  /** The long prompt being prefilled a chunk per step (one at a time). */
  private pending: Entry | null = null;
  private readonly byKey = new Map<string, Entry>();
  private tokensInFlight = 0;
  private loop: Promise<void> | null = null;
  private steps = 0;
  private lastBatchSize = 0;
  /** When each tenant last had a request admitted (an admission count), for taking turns. */
  private readonly lastAdmitted = new Map<string, number>();
  private admissions = 0;

  constructor(
    private readonly engine: StepExecutor,
    private readonly detokenizer: Detokenizer,
    private readonly eosTokenIds: ReadonlySet<number>,
    readonly limits: SchedulerLimits = DEFAULT_LIMITS,
  ) {}

  stats(): SchedulerStats {
    return {
      queued: this.queue.length,
      running: this.running.size + (this.pending ? 1 : 0),
      tokensInFlight: this.tokensInFlight,
      steps: this.steps,
      lastBatchSize: this.lastBatchSize,
    };
  }

  /** Queues a request; throws (overloaded / context_length_exceeded) when it can't be taken. */
  submit(key: string, request: GenerationRequest, sink: GenerationSink): void {
    const context = this.engine.config.maxPositions;
    checkPromptFits(request.tokens.length, context);
    if (this.byKey.has(key)) throw new Error(`duplicate request key ${key}`);
    if (this.queue.length >= this.limits.maxQueue) {
      throw queueFull({ queued: this.limits.maxQueue }, undefined, { retryAfterSeconds: 1 });
    }
    const budget = Math.min(request.tokens.length + request.maxNewTokens, context);
    if (budget > this.limits.maxTokensInFlight) {
      throw tokensInFlightExceeded({ budget, limit: this.limits.maxTokensInFlight }, 'max_new_tokens');
    }
    if (!this.engine.kvFits(1, budget)) {
      throw deviceKvBudgetExceeded({ budget }, 'max_new_tokens');
    }
    const entry: Entry = {
      key,
      generation: new Generation(request, this.eosTokenIds, context, this.detokenizer),
      sink,
      budget,
      admitted: false,
    };
    this.queue.push(entry);
    this.byKey.set(key, entry);
    this.kick();
  }

  /** Stops a request at the next step boundary (queued ones end at once). */
  cancel(key: string): void {
    const entry = this.byKey.get(key);
    if (!entry) return;
    entry.generation.cancel();
    const i = this.queue.indexOf(entry);
    if (i >= 0) {
      this.queue.splice(i, 1);
      this.finish(entry);
    }
  }

  /** Resolves once nothing is queued or running. */
  async idle(): Promise<void> {
    while (this.loop) await this.loop;
  }

  private kick(): void {
    if (!this.loop) {
      this.loop = this.run().finally(() => {
        this.loop = null;
        if (this.queue.length || this.running.size || this.pending) this.kick();
      });
    }
  }

  private async run(): Promise<void> {
    while (this.queue.length || this.running.size || this.pending) {
      this.reapFinished();
      const admitted = this.admit();
      const short = admitted.filter((e) => !this.isLong(e));
      if (short.length) await this.prefill(short);
      const long = admitted.find((e) => this.isLong(e));
      if (long) this.beginLong(long);
      if (this.pending) await this.continueLong(this.pending);
      this.reapFinished();
      if (this.running.size) await this.decode();
    }
  }

  private isLong(e: Entry): boolean {
    return e.generation.request.tokens.length > this.engine.prefillChunkTokens;
  }

  private admit(): Entry[] {
    const admitted: Entry[] = [];
    let prefillTokens = 0;
    while (this.queue.length) {
      const at = this.nextInTurn();
      const next = this.queue[at];
      const n = next.generation.request.tokens.length;
      const fitsBatch = this.running.size + (this.pending ? 1 : 0) + admitted.length < this.limits.maxBatchSize;
      const fitsTokens = this.tokensInFlight + next.budget <= this.limits.maxTokensInFlight && this.fitsKv(admitted, next);
      // a long prompt is prefilled a chunk per step, outside the step's prompt budget, one at a time
      const long = this.isLong(next);
      const fitsPrefill = long
        ? !this.pending && !admitted.some((e) => this.isLong(e))
        : admitted.length === 0 || prefillTokens + n <= this.limits.maxPrefillTokens;
      if (!fitsBatch || !fitsTokens || !fitsPrefill) break;
      this.queue.splice(at, 1);
      this.lastAdmitted.set(next.generation.request.tenant ?? '', ++this.admissions);
      admitted.push(next);
      if (!long) prefillTokens += n;
      next.admitted = true;
      this.tokensInFlight += next.budget;
    }
    return admitted;
  }

  /**
   * Whether the running rows, those admitted this step and `next` fit the engine's KV cache at
   * their longest budget (a device cache is padded to its longest row); if not, `next` waits.
   */
  private fitsKv(admitted: Entry[], next: Entry): boolean {
    const rows = [...this.running.values(), ...admitted, next];
    if (this.pending) rows.push(this.pending);
    return this.engine.kvFits(rows.length, Math.max(...rows.map((e) => e.budget)));
  }

  /** The queue index of the oldest request of the tenant admitted longest ago (never: first). */
  private nextInTurn(): number {
    let best = 0;
    let bestAdmitted = Infinity;
    const seen = new Set<string>();
    this.queue.forEach((e, i) => {
      const tenant = e.generation.request.tenant ?? '';
      if (seen.has(tenant)) return;
      seen.add(tenant);
      const last = this.lastAdmitted.get(tenant) ?? 0;
      if (last < bestAdmitted) {
        best = i;
        bestAdmitted = last;
      }
    });
    return best;
  }

  private async prefill(entries: Entry[]): Promise<void> {
    let outputs;
    try {
      outputs = await this.engine.prefill(entries.map((e) => prefillInput(e.generation.request)));
    } catch (err) {
      for (const e of entries) this.fail(e, err);
      return;
    }
    outputs.forEach((out, i) => {
      const e = entries[i];
      e.seq = out.id;
      this.running.set(out.id, e);
      e.generation.setApplied(out.applied);
      this.emit(e, out.logits);
    });
  }

  private beginLong(e: Entry): void {
    try {
      e.seq = this.engine.beginPrefill(prefillInput(e.generation.request));
      this.pending = e;
    } catch (err) {
      this.fail(e, err);
    }
  }

  /** The pending prompt's next chunk; after its last one it joins the running batch. */
  private async continueLong(e: Entry): Promise<void> {
    if (e.generation.done) return; // cancelled: reaped below
    let out;
    try {
      out = await this.engine.continuePrefill();
    } catch (err) {
      this.fail(e, err);
      return;
    }
    if (!out || this.pending !== e) return;
    this.pending = null;
    this.running.set(out.id, e);
    e.generation.setApplied(out.applied);
    this.emit(e, out.logits);
  }

  private async decode(): Promise<void> {
    const tokens = new Map<SequenceId, number>();
    const needLogits = new Set<SequenceId>();
    for (const [seq, e] of this.running) {
      tokens.set(seq, e.generation.tokens[e.generation.tokens.length - 1]);
      if (!e.generation.samplesGreedily) needLogits.add(seq);
    }
    this.lastBatchSize = tokens.size;
    this.steps++;
    let samples;
    try {
      samples = await this.engine.decodeStep(tokens, needLogits);
    } catch (err) {
      for (const e of [...this.running.values()]) this.fail(e, err);
      return;
    }
    for (const [seq, sample] of samples) {
      const e = this.running.get(seq);
      if (e && !e.generation.done) this.emit(e, sample);
    }
  }

  private emit(e: Entry, sample: Float32Array | StepSample): void {
    if (e.generation.done) return; // cancelled while the step ran
    const event =
      sample instanceof Float32Array
        ? e.generation.accept(sample)
        : 'logits' in sample
          ? e.generation.accept(sample.logits)
          : e.generation.acceptSampled(sample.token, sample.logprob);
    try {
      e.sink.onToken(event);
    } catch {
      e.generation.cancel(); // the consumer is gone
    }
  }

  private reapFinished(): void {
    for (const e of [...this.running.values()]) if (e.generation.done) this.finish(e);
    if (this.pending?.generation.done) this.finish(this.pending);
  }

  private finish(e: Entry): void {
    this.release(e);
    e.sink.onDone(e.generation.result());
  }

  private fail(e: Entry, err: unknown): void {
    this.release(e);
    const error = ReftError.from(err, 'generation failed: ');
    e.sink.onError(error);
  }

  private release(e: Entry): void {
    if (e.seq !== undefined && this.running.delete(e.seq)) this.engine.release(e.seq);
    if (e === this.pending) {
      this.pending = null;
      this.engine.release(e.seq!);
    }
    if (e.admitted) {
      e.admitted = false;
      this.tokensInFlight -= e.budget;
    }
    this.byKey.delete(e.key);
  }
}

/** What the engine prefills for a request: its prompt, its interventions, whether it reports them. */
function prefillInput(request: GenerationRequest): PrefillInput {
  return { tokens: request.tokens, interventions: request.interventions, returnCoefficients: request.returnCoefficients };
}
