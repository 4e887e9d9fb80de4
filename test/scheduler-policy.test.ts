import { describe, expect, it } from 'vitest';
import type { GenerationRequest, GenerationResult, TokenEvent } from '../src/engine/generation.ts';
import { GREEDY } from '../src/engine/sampler.ts';
import { DEFAULT_LIMITS, Scheduler, type SchedulerLimits } from '../src/engine/scheduler.ts';
import type { KvBudget, SequenceId, StepExecutor, StepOutputs, StepPlan } from '../src/engine/step-plan.ts';
import { ReftError } from '../src/errors.ts';

/**
 * The scheduler's policy (admission, tenant turns, chunking, budgets, endings) driven by a
 * runner that checks every plan against the rows it holds and answers with made-up logits:
 * no model, no ORT. Sequence s's next token is (s + its length) mod 7 + 1, never the EOS (0).
 */
const VOCAB = 8;
const EOS = 0;

class FakeRunner implements StepExecutor {
  readonly config = { maxPositions: 256 };
  readonly plans: StepPlan[] = [];
  /** Live rows: the batch's and the long prompt's, with their lengths. */
  readonly batch = new Map<SequenceId, number>();
  private long: { seq: SequenceId; next: number } | null = null;
  private nextId = 1;
  /** Parts to fail, by name, on the next plan that has them. */
  failNext: Partial<Record<'decode' | 'prefill' | 'chunk', Error>> = {};
  greedyOnDevice = false;

  constructor(
    readonly prefillChunkTokens: number,
    readonly kvBudget: KvBudget = { bytes: Infinity, onDevice: false },
  ) {}

  kvStepBytes(rows: number, tokens: number): number {
    return rows * tokens;
  }

  newSequenceId(): SequenceId {
    return this.nextId++;
  }

  /** Bytes the runner holds at the peak of the plan being run, by the same measure as the budget. */
  peakBytes(plan: StepPlan, budgets: ReadonlyMap<SequenceId, number>): number {
    const seqs = [
      ...this.batch.keys(),
      ...plan.prefill.map((p) => p.seq),
      ...(plan.chunk && plan.chunk.start === 0 ? [plan.chunk.seq] : []),
    ];
    return this.kvStepBytes(seqs.length, Math.max(0, ...seqs.map((s) => budgets.get(s) ?? 0)));
  }

  async execute(plan: StepPlan): Promise<StepOutputs> {
    this.plans.push(plan);
    await new Promise((r) => setImmediate(r)); // a step takes time: others get to run meanwhile
    const out: StepOutputs = { decoded: new Map(), prefilled: new Map(), failed: [] };
    for (const seq of plan.release) {
      this.batch.delete(seq);
      if (this.long?.seq === seq) this.long = null;
    }
    const inBatch = [...this.batch.keys()].filter((s) => s !== this.long?.seq);
    if (plan.decode.length) {
      expect(plan.decode.map((d) => d.seq).sort()).toEqual(inBatch.sort());
      if (this.failNext.decode) {
        out.failed.push({ seqs: plan.decode.map((d) => d.seq), error: this.failNext.decode });
        plan.decode.forEach((d) => this.batch.delete(d.seq));
        delete this.failNext.decode;
      } else {
        for (const d of plan.decode) {
          const length = this.batch.get(d.seq)! + 1;
          this.batch.set(d.seq, length);
          const token = ((d.seq + length) % 7) + 1;
          out.decoded.set(d.seq, d.logits || !this.greedyOnDevice ? { logits: oneHot(token) } : { token, logprob: 0 });
        }
      }
    }
    if (plan.prefill.length) {
      if (this.failNext.prefill) {
        out.failed.push({ seqs: plan.prefill.map((p) => p.seq), error: this.failNext.prefill });
        delete this.failNext.prefill;
      } else {
        for (const p of plan.prefill) {
          expect(this.batch.has(p.seq)).toBe(false);
          expect(p.input.tokens.length).toBeLessThanOrEqual(this.prefillChunkTokens);
          this.batch.set(p.seq, p.input.tokens.length);
          out.prefilled.set(p.seq, { id: p.seq, logits: oneHot(((p.seq + p.input.tokens.length) % 7) + 1) });
        }
      }
    }
    if (plan.chunk) {
      const c = plan.chunk;
      expect(c.end - c.start).toBeLessThanOrEqual(this.prefillChunkTokens);
      if (c.start === 0) {
        expect(this.long).toBeNull();
        this.long = { seq: c.seq, next: 0 };
        this.batch.set(c.seq, 0);
      }
      const long = this.long!;
      expect(long).toEqual({ seq: c.seq, next: c.start });
      if (this.failNext.chunk) {
        out.failed.push({ seqs: [c.seq], error: this.failNext.chunk });
        this.batch.delete(c.seq);
        this.long = null;
        delete this.failNext.chunk;
      } else {
        long.next = c.end;
        this.batch.set(c.seq, c.end);
        if (c.end === c.input.tokens.length) {
          this.long = null;
          out.prefilled.set(c.seq, { id: c.seq, logits: oneHot(((c.seq + c.end) % 7) + 1) });
        }
      }
    }
    return out;
  }
}

function oneHot(token: number): Float32Array {
  const logits = new Float32Array(VOCAB);
  logits[token] = 10;
  return logits;
}

const detokenizer = { createStreamDecoder: () => ({ push: (id: number) => `<${id}>`, flush: () => '' }) };

function request(promptLength: number, maxNewTokens: number, extra: Partial<GenerationRequest> = {}): GenerationRequest {
  return {
    tokens: Array.from({ length: promptLength }, (_, i) => 1 + (i % 7)),
    interventions: [],
    sampling: GREEDY,
    maxNewTokens,
    stop: [],
    ignoreEos: false,
    logprobs: false,
    topLogprobs: 0,
    ...extra,
  };
}

interface Submitted {
  events: TokenEvent[];
  done: Promise<GenerationResult>;
}

function harness(runner: FakeRunner, limits: Partial<SchedulerLimits> = {}) {
  const scheduler = new Scheduler(runner, detokenizer, new Set([EOS]), { ...DEFAULT_LIMITS, ...limits });
  const budgets = new Map<SequenceId, number>();
  const submit = (key: string, req: GenerationRequest): Submitted => {
    const events: TokenEvent[] = [];
    let settle: { onDone(r: GenerationResult): void; onError(e: ReftError): void } | undefined;
    const done = new Promise<GenerationResult>((onDone, onError) => (settle = { onDone, onError }));
    scheduler.submit(key, req, { onToken: (e) => events.push(e), ...settle! });
    return { events, done };
  };
  return { scheduler, submit, budgets };
}

/** The tokens a sequence gets from the fake runner alone: (seq + length) mod 7 + 1 after each step. */
function expectedTokens(seq: number, promptLength: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => ((seq + promptLength + i) % 7) + 1);
}

describe('the scheduler plans steps a runner executes', () => {
  it('every running sequence decodes each step, newcomers are prefilled in the same step, and each gets its own tokens', async () => {
    const runner = new FakeRunner(16);
    const { scheduler, submit } = harness(runner);
    const a = submit('a', request(5, 6));
    const b = submit('b', request(3, 4));
    const [ra, rb] = await Promise.all([a.done, b.done]);
    await scheduler.idle();
    expect(ra.tokens).toEqual(expectedTokens(1, 5, 6));
    expect(rb.tokens).toEqual(expectedTokens(2, 3, 4));
    expect(ra.finishReason).toBe('length');
    // the first plan prefills a alone (b arrived while it ran), the second decodes a and prefills b
    expect(runner.plans[0].prefill.map((p) => p.seq)).toEqual([1]);
    expect(runner.plans[1]).toMatchObject({ decode: [{ seq: 1 }], prefill: [{ seq: 2 }] });
    // the last plan releases what is left; the runner ends with no rows
    expect(runner.plans.at(-1)!.release.length).toBeGreaterThan(0);
    expect(runner.batch.size).toBe(0);
  });

  it('the batch never holds more than maxBatchSize sequences, a long prompt being prefilled included', async () => {
    const runner = new FakeRunner(4);
    const { scheduler, submit } = harness(runner, { maxBatchSize: 2 });
    const all = [submit('a', request(3, 5)), submit('b', request(10, 3)), submit('c', request(2, 4)), submit('d', request(3, 2))];
    await Promise.all(all.map((s) => s.done));
    await scheduler.idle();
    for (const plan of runner.plans) {
      const rows = plan.decode.length + plan.prefill.length + (plan.chunk ? 1 : 0);
      expect(rows).toBeLessThanOrEqual(2);
    }
  });

  it('a long prompt runs one chunk per step while running sequences keep decoding; a second long one waits its turn', async () => {
    const runner = new FakeRunner(4);
    const { scheduler, submit } = harness(runner);
    const short = submit('short', request(2, 12));
    const long1 = submit('long1', request(10, 2));
    const long2 = submit('long2', request(9, 2));
    const results = await Promise.all([short.done, long1.done, long2.done]);
    await scheduler.idle();
    const chunks = runner.plans.filter((p) => p.chunk).map((p) => [p.chunk!.seq, p.chunk!.start, p.chunk!.end]);
    expect(chunks).toEqual([
      [2, 0, 4],
      [2, 4, 8],
      [2, 8, 10],
      [3, 0, 4],
      [3, 4, 8],
      [3, 8, 9],
    ]);
    // while long1's chunks ran, short decoded in the same steps
    const withChunk = runner.plans.filter((p) => p.chunk?.seq === 2);
    expect(withChunk.slice(1).every((p) => p.decode.some((d) => d.seq === 1))).toBe(true);
    expect(results[1].tokens).toEqual(expectedTokens(2, 10, 2));
    expect(results[2].tokens).toEqual(expectedTokens(3, 9, 2));
  });

  it("a step's prompts are budgeted padded to the longest: rows × longest ≤ maxPrefillTokens", async () => {
    const runner = new FakeRunner(16);
    const { scheduler, submit } = harness(runner, { maxPrefillTokens: 16 });
    // all queued before the first plan: submit them inside one tick
    const subs = [submit('a', request(2, 3)), submit('b', request(7, 3)), submit('c', request(2, 3)), submit('d', request(1, 3))];
    await Promise.all(subs.map((s) => s.done));
    await scheduler.idle();
    const prefills = runner.plans.filter((p) => p.prefill.length).map((p) => p.prefill.map((x) => x.input.tokens.length));
    // a went alone (the loop started at its submit); then b and c (2 × 7 = 14), and d could not join (3 × 7 = 21)
    expect(prefills).toEqual([[2], [7, 2], [1]]);
    for (const lengths of prefills) expect(lengths.length * Math.max(...lengths)).toBeLessThanOrEqual(16);
  });

  it('requests wait for the KV budget (rows × longest budget) and all complete; one that could never fit is refused at once', async () => {
    // each request's budget is prompt + max_new_tokens = 10 tokens: two rows fit 25, three don't
    const runner = new FakeRunner(16, { bytes: 25, onDevice: false });
    const { scheduler, submit } = harness(runner);
    const budgets = new Map<SequenceId, number>();
    const subs = Array.from({ length: 5 }, (_, i) => submit(`r${i}`, request(4, 6)));
    const results = await Promise.all(subs.map((s) => s.done));
    await scheduler.idle();
    expect(results.every((r) => r.tokens.length === 6)).toBe(true);
    for (const plan of runner.plans) {
      for (const p of plan.prefill) budgets.set(p.seq, 10);
      const live = plan.decode.length + plan.prefill.length;
      expect(live).toBeLessThanOrEqual(2);
      expect(runner.peakBytes(plan, budgets)).toBeLessThanOrEqual(25);
    }
    let refused: unknown;
    try {
      submit('huge', request(20, 10));
    } catch (e) {
      refused = e;
    }
    expect(refused).toBeInstanceOf(ReftError);
    expect(refused).toMatchObject({ code: 'kv_budget_exceeded', field: 'max_new_tokens', status: 400 });
    expect((refused as Error).message).toContain('--kv-budget');
  });

  it('the device budget refuses with its own code', () => {
    const { submit } = harness(new FakeRunner(16, { bytes: 25, onDevice: true }));
    expect(() => submit('huge', request(20, 10))).toThrow(expect.objectContaining({ code: 'device_kv_budget_exceeded' }));
  });

  it('tenants take turns for a free slot', async () => {
    const runner = new FakeRunner(16);
    const { submit } = harness(runner, { maxBatchSize: 1 });
    const order: string[] = [];
    const run = (name: string, tenant: string) => {
      const s = submit(name, { ...request(3, 2), tenant });
      void s.done.then(() => order.push(name));
      return s.done;
    };
    await Promise.all([run('a1', 'a'), run('a2', 'a'), run('a3', 'a'), run('b1', 'b'), run('a4', 'a')]);
    expect(order).toEqual(['a1', 'b1', 'a2', 'a3', 'a4']);
  });

  it('a cancelled sequence ends with "cancelled" and its row is released by the next plan; a queued one ends at once', async () => {
    const runner = new FakeRunner(16);
    const { scheduler, submit } = harness(runner, { maxBatchSize: 1 });
    const a = submit('a', request(3, 100));
    const queued = submit('q', request(3, 5));
    while (a.events.length < 3) await new Promise((r) => setTimeout(r, 0));
    scheduler.cancel('q');
    expect((await queued.done).finishReason).toBe('cancelled');
    scheduler.cancel('a');
    const ra = await a.done;
    expect(ra.finishReason).toBe('cancelled');
    await scheduler.idle();
    expect(runner.plans.some((p) => p.release.includes(1))).toBe(true);
    expect(runner.batch.size).toBe(0);
  });

  it("a failed part ends its requests with the runner's error; the others go on", async () => {
    const runner = new FakeRunner(4);
    const { scheduler, submit } = harness(runner);
    const a = submit('a', request(3, 8));
    while (a.events.length < 1) await new Promise((r) => setTimeout(r, 0));
    runner.failNext.prefill = new Error('prefill broke');
    const b = submit('b', request(2, 3));
    await expect(b.done).rejects.toMatchObject({ message: expect.stringContaining('prefill broke') });
    runner.failNext.chunk = new Error('chunk broke');
    const c = submit('c', request(9, 3));
    await expect(c.done).rejects.toMatchObject({ message: expect.stringContaining('chunk broke') });
    expect((await a.done).tokens).toHaveLength(8);
    const d = submit('d', request(3, 50));
    while (d.events.length < 2) await new Promise((r) => setTimeout(r, 0));
    runner.failNext.decode = new Error('decode broke');
    await expect(d.done).rejects.toMatchObject({ message: expect.stringContaining('decode broke') });
    await scheduler.idle();
    expect(runner.batch.size).toBe(0);
    expect(scheduler.stats()).toMatchObject({ queued: 0, running: 0, tokensInFlight: 0 });
  });

  it('greedy rows may take the device-picked token; rows that sample ask for their logits', async () => {
    const runner = new FakeRunner(16);
    runner.greedyOnDevice = true;
    const { scheduler, submit } = harness(runner);
    const greedy = submit('g', request(3, 4));
    const sampled = submit('s', request(3, 4, { sampling: { ...GREEDY, temperature: 0.7, seed: 1 } }));
    const [rg] = await Promise.all([greedy.done, sampled.done]);
    await scheduler.idle();
    expect(rg.tokens).toEqual(expectedTokens(1, 3, 4));
    const flags = runner.plans.flatMap((p) => p.decode.map((d) => [d.seq, d.logits]));
    expect(flags.filter(([s]) => s === 1).every(([, l]) => l === false)).toBe(true);
    expect(flags.filter(([s]) => s === 2).every(([, l]) => l === true)).toBe(true);
  });
});
