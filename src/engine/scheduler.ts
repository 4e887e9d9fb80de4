import { ReftError, deviceKvBudgetExceeded, kvBudgetExceeded, queueFull, tokensInFlightExceeded } from '../errors.ts';
import {
  Generation,
  checkPromptFits,
  type Detokenizer,
  type GenerationRequest,
  type GenerationResult,
  type TokenEvent,
} from './generation.ts';
import { PrefixCache, type BlockId, type PrefixCacheStats } from '../prefix-cache/block-index.ts';
import { PREFIX_BLOCK_TOKENS, firstEditedPosition, prefixBlockKeys } from '../prefix-cache/block-keys.ts';
import type { BlockSave, ChunkRun, PrefillInput, SequenceId, StepExecutor, StepOutputs, StepPlan, StepSample } from './step-plan.ts';

/**
 * Continuous batching, as a policy over plain step plans (src/engine/step-plan.ts). Requests
 * wait in a bounded queue, in which tenants take turns (the oldest request of the tenant
 * admitted longest ago goes next; first come first served within a tenant). Each step, `plan`
 * says which sequences leave, one decode token for every running sequence, which newcomers
 * (that fit the batch, token and KV budgets) are prefilled together, and the runs of prompts
 * prefilled over a cache of their own: the next chunk of the one long prompt prefilled a chunk
 * per step (so running sequences keep decoding meanwhile), and prompts whose leading blocks the
 * prefix cache holds (src/prefix-cache/block-index.ts), which start after them. The runner executes
 * the plan; `apply` takes its outputs: tokens are picked and sent, finished sequences leave at
 * the next step.
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

/** Runs over a cache of their own in one step: each reads every weight once, so a step of many would stall decoding. */
const MAX_RUNS_PER_STEP = 8;

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
  /** Its prompt's prefix-cache block keys (none when the request or the runner has no cache). */
  blockKeys: string[];
  /** The leading ones it may load: with its coefficients asked for, only those before its first edit (their edits must run). */
  usableKeys: string[];
  /** Prefix-cache blocks it loads or saves, pinned until its prefill has run. */
  pins: BlockId[];
}

/** A prompt prefilled over a cache of its own, a run per step. */
interface Run {
  entry: Entry;
  input: PrefillInput;
  next: number;
  /** Blocks its first run loads (its cached prefix). */
  cached: BlockId[];
  save: BlockSave[];
}

export interface SchedulerStats {
  queued: number;
  running: number;
  tokensInFlight: number;
  steps: number;
  lastBatchSize: number;
  prefixCache: PrefixCacheStats | null;
}

export class Scheduler {
  private readonly queue: Entry[] = [];
  /** The decoding batch. */
  private readonly running = new Map<SequenceId, Entry>();
  /** Prompts the step in flight prefills together; they join `running` with its outputs. */
  private readonly starting = new Map<SequenceId, Entry>();
  /** Prompts prefilled a run per step, in admission order. */
  private readonly runs = new Map<SequenceId, Run>();
  /** Sequences that ended since the last plan: the next one releases their KV rows. */
  private ended: SequenceId[] = [];
  private readonly byKey = new Map<string, Entry>();
  private readonly cache: PrefixCache | null;
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
  ) {
    const c = runner.prefixCache;
    this.cache = c ? new PrefixCache(c.budgetBytes, c.blockBytes) : null;
  }

  stats(): SchedulerStats {
    return {
      queued: this.queue.length,
      running: this.running.size + this.starting.size + this.runs.size,
      tokensInFlight: this.tokensInFlight,
      steps: this.steps,
      lastBatchSize: this.lastBatchSize,
      prefixCache: this.cache?.stats ?? null,
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
    const blockKeys =
      this.cache && request.prefixCache ? prefixBlockKeys(request.tokens, request.interventions, request.prefixCache.namespace) : [];
    const usableKeys = request.returnCoefficients
      ? blockKeys.slice(0, Math.floor(firstEditedPosition(request.interventions, request.tokens.length) / PREFIX_BLOCK_TOKENS))
      : blockKeys;
    const entry: Entry = {
      key,
      generation: new Generation(request, this.eosTokenIds, context, this.detokenizer),
      sink,
      budget,
      admitted: false,
      blockKeys,
      usableKeys,
      pins: [],
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
        if (this.queue.length || this.running.size || this.runs.size || this.ended.length) this.kick();
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
        outputs = { decoded: new Map(), prefilled: new Map(), failed: [{ seqs: planned(plan), error }], saved: [] };
      }
      this.apply(plan, outputs);
    }
  }

  /**
   * The next step, or null when there is nothing to do: the sequences that ended and the blocks
   * evicted, a token for every running sequence, the newcomers admitted, and the runs.
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
      const input = prefillInput(e.generation.request);
      const cached = this.cache?.match(e.usableKeys) ?? [];
      const save = this.cache?.allocate(e.blockKeys, cached.length) ?? [];
      e.pins = [...cached, ...save.map((s) => s.id)];
      e.generation.cachedTokens = cached.length * PREFIX_BLOCK_TOKENS;
      if (cached.length || this.isLong(e)) {
        this.runs.set(e.seq, { entry: e, input, next: cached.length * PREFIX_BLOCK_TOKENS, cached, save });
      } else {
        this.starting.set(e.seq, e);
        prefill.push({ seq: e.seq, input, ...(save.length ? { save } : {}) });
      }
    }
    const chunks: ChunkRun[] = [...this.runs.values()].map((r) => ({
      seq: r.entry.seq!,
      input: r.input,
      start: r.next,
      end: Math.min(r.input.tokens.length, r.next + this.runner.prefillChunkTokens),
      ...(r.cached.length ? { cached: r.cached } : {}),
      ...(r.save.length ? { save: r.save } : {}),
    }));
    const release = this.ended.splice(0);
    const dropBlocks = this.cache?.takeDropped() ?? [];
    if (!release.length && !dropBlocks.length && !decode.length && !prefill.length && !chunks.length) return null;
    if (decode.length) {
      this.steps++;
      this.lastBatchSize = decode.length;
    }
    return { release, dropBlocks, decode, prefill, chunks };
  }

  /** Takes a step's outputs: failures end their requests, every new token is picked and sent. */
  apply(plan: StepPlan, outputs: StepOutputs): void {
    this.cache?.saved(outputs.saved);
    for (const { seqs, error } of outputs.failed) {
      for (const seq of seqs) {
        const e = this.running.get(seq) ?? this.starting.get(seq) ?? this.runs.get(seq)?.entry;
        if (e) this.fail(e, error); // the runner holds no rows for it any more
      }
    }
    for (const [seq, sample] of outputs.decoded) {
      const e = this.running.get(seq);
      if (e) this.emit(e, sample);
    }
    for (const c of plan.chunks) {
      const run = this.runs.get(c.seq);
      if (run) [run.next, run.cached] = [c.end, []];
    }
    for (const [seq, out] of outputs.prefilled) {
      const e = this.starting.get(seq) ?? this.runs.get(seq)?.entry;
      if (!e) continue;
      this.starting.delete(seq);
      this.runs.delete(seq);
      this.unpin(e);
      this.running.set(seq, e);
      e.generation.setApplied(out.applied);
      this.emit(e, { logits: out.logits });
    }
  }

  private isLong(e: Entry): boolean {
    return e.generation.request.tokens.length > this.runner.prefillChunkTokens;
  }

  /** How many prompt tokens of `e` the cache holds now. */
  private cachedTokens(e: Entry): number {
    return this.cache ? this.cache.peek(e.usableKeys) * PREFIX_BLOCK_TOKENS : 0;
  }

  private admit(): Entry[] {
    const admitted: Entry[] = [];
    // prompts prefilled together this step (their padded tokens), and runs over their own cache
    let rows = 0;
    let longestRow = 0;
    let runs = this.runs.size;
    let prefillTokens = 0;
    const long = () => [...this.runs.values()].some((r) => r.input.tokens.length - r.next > this.runner.prefillChunkTokens);
    let longAdmitted = long();
    while (this.queue.length) {
      const at = this.nextInTurn();
      const next = this.queue[at];
      const n = next.generation.request.tokens.length;
      const fitsBatch = this.running.size + this.runs.size + admitted.length < this.limits.maxBatchSize;
      const fitsTokens = this.tokensInFlight + next.budget <= this.limits.maxTokensInFlight;
      const computed = n - this.cachedTokens(next);
      const asRun = computed < n || this.isLong(next);
      const multiChunk = computed > this.runner.prefillChunkTokens;
      // the long prompt runs a chunk per step outside the step's prompt budget, one at a time;
      // the rest count their computed tokens, prompts run together padded to the longest
      const tokens = asRun ? computed : (rows + 1) * Math.max(longestRow, n) - rows * longestRow;
      const fitsPrefill = multiChunk
        ? !longAdmitted
        : admitted.length === 0 || (prefillTokens + tokens <= this.limits.maxPrefillTokens && (!asRun || runs < MAX_RUNS_PER_STEP));
      // the KV budget last: making room for it may evict prefix-cache blocks
      if (!fitsBatch || !fitsTokens || !fitsPrefill || !this.fitsKv(admitted, next)) break;
      this.queue.splice(at, 1);
      this.lastAdmitted.set(next.generation.request.tenant ?? '', ++this.admissions);
      admitted.push(next);
      if (multiChunk) longAdmitted = true;
      else prefillTokens += tokens;
      if (asRun) runs++;
      else [rows, longestRow] = [rows + 1, Math.max(longestRow, n)];
      next.admitted = true;
      this.tokensInFlight += next.budget;
    }
    return admitted;
  }

  /**
   * Whether the running rows, those admitted this step and `next` fit the KV budget at their
   * longest budget (the batch is padded to its longest row); if not, `next` waits. On a device
   * the prefix cache's blocks share the budget, and rows evict them.
   */
  private fitsKv(admitted: Entry[], next: Entry): boolean {
    const rows = [...this.running.values(), ...[...this.runs.values()].map((r) => r.entry), ...admitted, next];
    const bytes = this.runner.kvStepBytes(rows.length, Math.max(...rows.map((e) => e.budget)));
    const { bytes: budget, onDevice } = this.runner.kvBudget;
    if (onDevice && this.cache) this.cache.shrink(budget - bytes);
    return bytes + (onDevice ? (this.cache?.stats.bytes ?? 0) : 0) <= budget;
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
    for (const r of [...this.runs.values()]) if (r.entry.generation.done) this.finish(r.entry);
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
    return this.running.delete(seq) || this.starting.delete(seq) || this.runs.delete(seq);
  }

  private settle(e: Entry): void {
    this.unpin(e);
    if (e.admitted) {
      e.admitted = false;
      this.tokensInFlight -= e.budget;
    }
    this.byKey.delete(e.key);
  }

  private unpin(e: Entry): void {
    this.cache?.unpin(e.pins);
    e.pins = [];
  }
}

/** Every sequence a plan runs (what a step that failed as a whole fails). */
function planned(plan: StepPlan): SequenceId[] {
  return [...plan.decode.map((d) => d.seq), ...plan.prefill.map((p) => p.seq), ...plan.chunks.map((c) => c.seq)];
}

/** What the runner prefills for a request: its prompt, its interventions, whether it reports them. */
function prefillInput(request: GenerationRequest): PrefillInput {
  return { tokens: request.tokens, interventions: request.interventions, returnCoefficients: request.returnCoefficients };
}
