import { ReftError, deviceKvBudgetExceeded, kvBudgetExceeded, queueFull, tokensInFlightExceeded } from '../errors.ts';
import {
  Generation,
  checkPromptFits,
  type Detokenizer,
  type GenerationRequest,
  type GenerationResult,
  type TokenEvent,
} from './generation.ts';
import type { PrefillInput, SequenceId, StepExecutor, StepOutputs, StepPlan, StepSample } from './step-plan.ts';

/**
 * Continuous batching, as a policy over plain step plans (src/engine/step-plan.ts). Requests
 * wait in a bounded queue, in which tenants take turns (the oldest request of the tenant
 * admitted longest ago goes next; first come first served within a tenant). Each step, `plan`
 * says which sequences leave, one decode token for every running sequence, which newcomers
 * (that fit the batch, token and KV budgets) are prefilled together, and the next chunk of the
 * one long prompt being prefilled a chunk per step, so running sequences keep decoding
 * meanwhile. The runner executes the plan; `apply` takes its outputs: tokens are picked and
 * sent, finished sequences leave at the next step.
 */
export interface SchedulerLimits {
  maxBatchSize: number;
  /** Bound on Σ (prompt + max_new_tokens) over running sequences. */
  maxTokensInFlight: number;
  /** Requests waiting beyond this are refused (503) instead of growing memory. */
  maxQueue: number;
  /** Prompt tokens prefilled in one step, padding included, so a burst of prompts doesn't stall decoding. */
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
  /** Its sequence, from admission on. */
  seq?: SequenceId;
  /** Prompt + max_new_tokens (within the context): the longest its KV rows can grow. */
  budget: number;
  /** Counted in tokensInFlight (from admission until it ends). */
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
  /** The decoding batch. */
  private readonly running = new Map<SequenceId, Entry>();
  /** Prompts the step in flight prefills; they join `running` with its outputs. */
  private readonly starting = new Map<SequenceId, Entry>();
  /** The long prompt being prefilled a chunk per step (one at a time), and its next token. */
  private long: { entry: Entry; input: PrefillInput; next: number } | null = null;
  /** Sequences that ended since the last plan: the next one releases their KV rows. */
  private ended: SequenceId[] = [];
  private readonly byKey = new Map<string, Entry>();
  private tokensInFlight = 0;
  private loop: Promise<void> | null = null;
  private steps = 0;
  private lastBatchSize = 0;
  /** When each tenant last had a request admitted (an admission count), for taking turns. */
  private readonly lastAdmitted = new Map<string, number>();
  private admissions = 0;

  constructor(
    private readonly runner: StepExecutor,
    private readonly detokenizer: Detokenizer,
    private readonly eosTokenIds: ReadonlySet<number>,
    readonly limits: SchedulerLimits = DEFAULT_LIMITS,
  ) {}

  stats(): SchedulerStats {
    return {
      queued: this.queue.length,
      running: this.running.size + this.starting.size + (this.long ? 1 : 0),
      tokensInFlight: this.tokensInFlight,
      steps: this.steps,
      lastBatchSize: this.lastBatchSize,
    };
  }

  /** Queues a request; throws (overloaded, context or budget exceeded) when it can't be taken. */
  submit(key: string, request: GenerationRequest, sink: GenerationSink): void {
    const context = this.runner.config.maxPositions;
    checkPromptFits(request.tokens.length, context);
    if (this.byKey.has(key)) throw new Error(`duplicate request key ${key}`);
    if (this.queue.length >= this.limits.maxQueue) {
      throw queueFull({ queued: this.limits.maxQueue }, undefined, { retryAfterSeconds: 1 });
    }
    const budget = Math.min(request.tokens.length + request.maxNewTokens, context);
    if (budget > this.limits.maxTokensInFlight) {
      throw tokensInFlightExceeded({ budget, limit: this.limits.maxTokensInFlight }, 'max_new_tokens');
    }
    const bytes = this.runner.kvStepBytes(1, budget);
    const kv = this.runner.kvBudget;
    if (bytes > kv.bytes) {
      throw kv.onDevice
        ? deviceKvBudgetExceeded({ budget }, 'max_new_tokens')
        : kvBudgetExceeded({ budget, bytes, limit: kv.bytes }, 'max_new_tokens');
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
        if (this.queue.length || this.running.size || this.long || this.ended.length) this.kick();
      });
    }
  }

  private async run(): Promise<void> {
    for (let plan = this.plan(); plan; plan = this.plan()) {
      let outputs: StepOutputs;
      try {
        outputs = await this.runner.execute(plan);
      } catch (error) {
        // not one part's failure: whatever rows the runner still holds for them go with the next plan
        this.ended.push(...planned(plan));
        outputs = { decoded: new Map(), prefilled: new Map(), failed: [{ seqs: planned(plan), error }] };
      }
      this.apply(plan, outputs);
    }
  }

  /**
   * The next step, or null when there is nothing to do: the sequences that ended, a token for
   * every running one, the newcomers admitted, and the long prompt's next chunk.
   */
  plan(): StepPlan | null {
    this.reap();
    const decode = [...this.running].map(([seq, e]) => ({
      seq,
      token: e.generation.tokens[e.generation.tokens.length - 1],
      logits: !e.generation.samplesGreedily,
    }));
    const prefill: StepPlan['prefill'] = [];
    for (const e of this.admit()) {
      e.seq = this.runner.newSequenceId();
      if (this.isLong(e)) {
        this.long = { entry: e, input: prefillInput(e.generation.request), next: 0 };
      } else {
        this.starting.set(e.seq, e);
        prefill.push({ seq: e.seq, input: prefillInput(e.generation.request) });
      }
    }
    let chunk: StepPlan['chunk'] = null;
    if (this.long) {
      const { entry, input, next } = this.long;
      chunk = { seq: entry.seq!, input, start: next, end: Math.min(input.tokens.length, next + this.runner.prefillChunkTokens) };
    }
    const release = this.ended.splice(0);
    if (!release.length && !decode.length && !prefill.length && !chunk) return null;
    if (decode.length) {
      this.steps++;
      this.lastBatchSize = decode.length;
    }
    return { release, decode, prefill, chunk };
  }

  /** Takes a step's outputs: failures end their requests, every new token is picked and sent. */
  apply(plan: StepPlan, outputs: StepOutputs): void {
    for (const { seqs, error } of outputs.failed) {
      for (const seq of seqs) {
        const e = this.running.get(seq) ?? this.starting.get(seq) ?? (this.long?.entry.seq === seq ? this.long.entry : undefined);
        if (e) this.fail(e, error); // the runner holds no rows for it any more
      }
    }
    for (const [seq, sample] of outputs.decoded) {
      const e = this.running.get(seq);
      if (e) this.emit(e, sample);
    }
    if (plan.chunk && this.long?.entry.seq === plan.chunk.seq) this.long.next = plan.chunk.end;
    for (const [seq, out] of outputs.prefilled) {
      const e = this.starting.get(seq) ?? (this.long?.entry.seq === seq ? this.long.entry : undefined);
      if (!e) continue;
      this.starting.delete(seq);
      if (e === this.long?.entry) this.long = null;
      this.running.set(seq, e);
      e.generation.setApplied(out.applied);
      this.emit(e, { logits: out.logits });
    }
  }

  private isLong(e: Entry): boolean {
    return e.generation.request.tokens.length > this.runner.prefillChunkTokens;
  }

  private admit(): Entry[] {
    const admitted: Entry[] = [];
    let shortRows = 0;
    let longestShort = 0;
    while (this.queue.length) {
      const at = this.nextInTurn();
      const next = this.queue[at];
      const n = next.generation.request.tokens.length;
      const fitsBatch = this.running.size + (this.long ? 1 : 0) + admitted.length < this.limits.maxBatchSize;
      const fitsTokens = this.tokensInFlight + next.budget <= this.limits.maxTokensInFlight && this.fitsKv(admitted, next);
      // a long prompt is prefilled a chunk per step, outside the step's prompt budget, one at a time;
      // short ones run together, padded to the longest
      const long = this.isLong(next);
      const fitsPrefill = long
        ? !this.long && !admitted.some((e) => this.isLong(e))
        : shortRows === 0 || (shortRows + 1) * Math.max(longestShort, n) <= this.limits.maxPrefillTokens;
      if (!fitsBatch || !fitsTokens || !fitsPrefill) break;
      this.queue.splice(at, 1);
      this.lastAdmitted.set(next.generation.request.tenant ?? '', ++this.admissions);
      admitted.push(next);
      if (!long) {
        shortRows++;
        longestShort = Math.max(longestShort, n);
      }
      next.admitted = true;
      this.tokensInFlight += next.budget;
    }
    return admitted;
  }

  /**
   * Whether the running rows, those admitted this step and `next` fit the KV budget at their
   * longest budget (the batch is padded to its longest row); if not, `next` waits.
   */
  private fitsKv(admitted: Entry[], next: Entry): boolean {
    const rows = [...this.running.values(), ...admitted, next];
    if (this.long) rows.push(this.long.entry);
    return this.runner.kvStepBytes(rows.length, Math.max(...rows.map((e) => e.budget))) <= this.runner.kvBudget.bytes;
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

  private emit(e: Entry, sample: StepSample): void {
    if (e.generation.done) return; // cancelled while the step ran
    const event = 'logits' in sample ? e.generation.accept(sample.logits) : e.generation.acceptSampled(sample.token, sample.logprob);
    try {
      e.sink.onToken(event);
    } catch {
      e.generation.cancel(); // the consumer is gone
    }
  }

  /** Ends the finished or cancelled sequences: their rows are released by the next plan. */
  private reap(): void {
    for (const e of [...this.running.values()]) if (e.generation.done) this.finish(e);
    if (this.long?.entry.generation.done) this.finish(this.long.entry);
  }

  private finish(e: Entry): void {
    if (e.seq !== undefined && this.forget(e)) this.ended.push(e.seq);
    this.settle(e);
    e.sink.onDone(e.generation.result());
  }

  private fail(e: Entry, err: unknown): void {
    this.forget(e);
    this.settle(e);
    e.sink.onError(ReftError.from(err, 'generation failed: '));
  }

  /** Takes a sequence out of the batch's bookkeeping; whether it held KV rows. */
  private forget(e: Entry): boolean {
    const seq = e.seq!;
    if (this.long?.entry === e) {
      this.long = null;
      return true;
    }
    return this.running.delete(seq) || this.starting.delete(seq);
  }

  private settle(e: Entry): void {
    if (e.admitted) {
      e.admitted = false;
      this.tokensInFlight -= e.budget;
    }
    this.byKey.delete(e.key);
  }
}

/** Every sequence a plan runs (what a step that failed as a whole fails). */
function planned(plan: StepPlan): SequenceId[] {
  return [...plan.decode.map((d) => d.seq), ...plan.prefill.map((p) => p.seq), ...(plan.chunk ? [plan.chunk.seq] : [])];
}

/** What the runner prefills for a request: its prompt, its interventions, whether it reports them. */
function prefillInput(request: GenerationRequest): PrefillInput {
  return { tokens: request.tokens, interventions: request.interventions, returnCoefficients: request.returnCoefficients };
}
