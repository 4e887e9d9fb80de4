import { describe, expect, it } from 'vitest';
import type { GenerationRequest, GenerationResult, TokenEvent } from '../src/engine/generation.ts';
import { GREEDY } from '../src/sampling/sampler.ts';
import { DEFAULT_LIMITS, Scheduler, type SchedulerLimits } from '../src/engine/scheduler.ts';
import type { BlockId } from '../src/prefix-cache/block-index.ts';
import { PREFIX_BLOCK_TOKENS } from '../src/prefix-cache/block-keys.ts';
import type { BlockSave, KvBudget, SequenceId, StepExecutor, StepOutputs, StepPlan } from '../src/engine/step-plan.ts';
import { ReftError } from '../src/errors.ts';

/**
 * The scheduler's policy (admission, tenant turns, chunking, budgets, endings) driven by a
 * runner that checks every plan against the rows it holds and answers with made-up logits:
 * no model, no ORT. Sequence s's next token is (s + its length) mod 7 + 1, never the EOS (0).
 */
const VOCAB = 8;
const EOS = 0;

class FakeRunner implements StepExecutor {
  readonly config = { maxPositions: 1024 };
  readonly plans: StepPlan[] = [];
  /** Live rows: the batch's and the prompts' being prefilled a run at a time, with their lengths. */
  readonly batch = new Map<SequenceId, number>();
  /** Prompts being prefilled a run at a time, and the token each is at. */
  private readonly runs = new Map<SequenceId, number>();
  /** Prefix-cache blocks held. */
  readonly blocks = new Set<BlockId>();
  private nextId = 1;
  /** Parts to fail, by name, on the next plan that has them. */
  failNext: Partial<Record<'decode' | 'prefill' | 'chunk', Error>> = {};
  greedyOnDevice = false;

  constructor(
    readonly prefillChunkTokens: number,
    readonly kvBudget: KvBudget = { bytes: Infinity, onDevice: false },
    readonly prefixCache: { budgetBytes: number; blockBytes: number } | null = null,
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
      ...plan.chunks.filter((c) => !this.runs.has(c.seq)).map((c) => c.seq),
    ];
    return this.kvStepBytes(seqs.length, Math.max(0, ...seqs.map((s) => budgets.get(s) ?? 0)));
  }

  private save(saves: BlockSave[] | undefined, upTo: number, saved: BlockId[]): void {
    for (const { index, id } of saves ?? []) {
      if (this.blocks.has(id) || (index + 1) * PREFIX_BLOCK_TOKENS > upTo) continue;
      this.blocks.add(id);
      saved.push(id);
    }
  }

  async execute(plan: StepPlan): Promise<StepOutputs> {
    this.plans.push(plan);
    await new Promise((r) => setImmediate(r)); // a step takes time: others get to run meanwhile
    const out: StepOutputs = { decoded: new Map(), prefilled: new Map(), failed: [], saved: [] };
    for (const seq of plan.release) {
      this.batch.delete(seq);
      this.runs.delete(seq);
    }
    for (const id of plan.dropBlocks) {
      expect(this.blocks.has(id)).toBe(true);
      this.blocks.delete(id);
    }
    const inBatch = [...this.batch.keys()].filter((s) => !this.runs.has(s));
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
          this.save(p.save, p.input.tokens.length, out.saved);
          out.prefilled.set(p.seq, { id: p.seq, logits: oneHot(((p.seq + p.input.tokens.length) % 7) + 1) });
        }
      }
    }
    for (const c of plan.chunks) {
      expect(c.end - c.start).toBeLessThanOrEqual(this.prefillChunkTokens);
      if (!this.runs.has(c.seq)) {
        for (const id of c.cached ?? []) expect(this.blocks.has(id)).toBe(true);
        expect(c.start).toBe((c.cached?.length ?? 0) * PREFIX_BLOCK_TOKENS);
        this.runs.set(c.seq, c.start);
        this.batch.set(c.seq, c.start);
      }
      expect(this.runs.get(c.seq)).toBe(c.start);
      if (this.failNext.chunk) {
        out.failed.push({ seqs: [c.seq], error: this.failNext.chunk });
        this.batch.delete(c.seq);
        this.runs.delete(c.seq);
        delete this.failNext.chunk;
        continue;
      }
      this.runs.set(c.seq, c.end);
      this.batch.set(c.seq, c.end);
      this.save(c.save, c.end, out.saved);
      if (c.end === c.input.tokens.length) {
        this.runs.delete(c.seq);
        out.prefilled.set(c.seq, { id: c.seq, logits: oneHot(((c.seq + c.end) % 7) + 1) });
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
      const rows = plan.decode.length + plan.prefill.length + plan.chunks.length;
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
    const chunks = runner.plans.flatMap((p) => p.chunks.map((c) => [c.seq, c.start, c.end]));
    expect(chunks).toEqual([
      [2, 0, 4],
      [2, 4, 8],
      [2, 8, 10],
      [3, 0, 4],
      [3, 4, 8],
      [3, 8, 9],
    ]);
    // while long1's chunks ran, short decoded in the same steps
    const withChunk = runner.plans.filter((p) => p.chunks.some((c) => c.seq === 2));
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

describe('the prefix cache in the plans', () => {
  const BLOCK_BYTES = 10;
  const cached = (budgetBlocks: number, chunk = 512, kv?: KvBudget) =>
    new FakeRunner(chunk, kv, { budgetBytes: budgetBlocks * BLOCK_BYTES, blockBytes: BLOCK_BYTES });
  const withCache = (promptLength: number, maxNew: number, namespace = 'tenant:a', extra: Partial<GenerationRequest> = {}) =>
    request(promptLength, maxNew, { prefixCache: { namespace }, ...extra });

  it('a prompt seen before loads its full blocks and computes only the rest; the result reports them', async () => {
    const runner = cached(100);
    const { scheduler, submit } = harness(runner);
    const first = await submit('a', withCache(200, 3)).done;
    const second = await submit('b', withCache(200, 3)).done;
    await scheduler.idle();
    expect(first.cachedTokens).toBe(0);
    expect(second.cachedTokens).toBe(3 * PREFIX_BLOCK_TOKENS); // 200 tokens: blocks 0..2, the last token's block is computed
    const saving = runner.plans.find((p) => p.prefill.some((r) => r.seq === 1))!.prefill[0];
    expect(saving.save!.map((s) => s.index)).toEqual([0, 1, 2]);
    const loading = runner.plans.flatMap((p) => p.chunks).find((c) => c.seq === 2)!;
    expect(loading).toMatchObject({ start: 192, end: 200, cached: saving.save!.map((s) => s.id) });
    expect(second.tokens).toEqual(expectedTokens(2, 200, 3));
    // another namespace, or a request that opts out, computes its prompt whole
    expect((await submit('c', withCache(200, 3, 'tenant:b')).done).cachedTokens).toBe(0);
    expect((await submit('d', request(200, 3)).done).cachedTokens).toBe(0);
  });

  it('blocks being saved are not loaded by a prompt in the same step', async () => {
    const runner = cached(100);
    const { scheduler, submit } = harness(runner);
    // a and b queue while a step is in flight, so the next plan admits both
    const busy = submit('busy', request(3, 4));
    const [a, b] = await Promise.all([submit('a', withCache(150, 2)).done, submit('b', withCache(150, 2)).done]);
    await busy.done;
    await scheduler.idle();
    expect([a.cachedTokens, b.cachedTokens]).toEqual([0, 0]);
    const both = runner.plans.find((p) => p.prefill.length === 2)!;
    expect(both.prefill.map((r) => r.save?.length ?? 0)).toEqual([2, 0]); // the second has nothing new to save
  });

  it('a prompt longer than a chunk resumes after its cached blocks, a chunk per step, saving blocks as they are computed', async () => {
    const runner = cached(100, 100);
    const { scheduler, submit } = harness(runner);
    await submit('a', withCache(100, 2)).done; // block 0
    const long = await submit('b', withCache(400, 2)).done;
    const again = await submit('c', withCache(400, 2)).done;
    await scheduler.idle();
    expect(long.cachedTokens).toBe(64);
    expect(runner.plans.flatMap((p) => p.chunks.filter((c) => c.seq === 2).map((c) => [c.start, c.end]))).toEqual([
      [64, 164],
      [164, 264],
      [264, 364],
      [364, 400],
    ]);
    expect(again.cachedTokens).toBe(384); // every full block before the last token
    expect(long.tokens).toEqual(expectedTokens(2, 400, 2));
  });

  it('the least recently used blocks are evicted to stay within the budget, and the runner frees them', async () => {
    const runner = cached(4);
    const { scheduler, submit } = harness(runner);
    const prompt = (seed: number) => ({ ...withCache(150, 1), tokens: Array.from({ length: 150 }, (_, i) => 1 + ((i + seed) % 7)) });
    await submit('a', prompt(1)).done; // 2 blocks
    await submit('b', prompt(2)).done; // 2 more: full
    await submit('a2', prompt(1)).done; // a's blocks are used again
    await submit('c', prompt(3)).done; // evicts b's, the least recently used
    await scheduler.idle();
    expect(scheduler.stats().prefixCache).toEqual({ blocks: 4, bytes: 4 * BLOCK_BYTES, evictions: 2 });
    expect(runner.blocks.size).toBe(4);
    expect((await submit('a3', prompt(1)).done).cachedTokens).toBe(128);
    expect((await submit('b2', prompt(2)).done).cachedTokens).toBe(0);
  });

  it('a prefill that fails saves nothing: its blocks are forgotten and no later prompt loads them', async () => {
    const runner = cached(100);
    const { scheduler, submit } = harness(runner);
    runner.failNext.prefill = new Error('prefill broke');
    await expect(submit('a', withCache(200, 2)).done).rejects.toThrow('prefill broke');
    const again = await submit('b', withCache(200, 2)).done;
    await scheduler.idle();
    expect(again.cachedTokens).toBe(0);
    expect(runner.blocks.size).toBe(3);
  });

  it('a request for its coefficients loads only the blocks before its first edit (the edits must run to be read)', async () => {
    const runner = cached(100);
    const { scheduler, submit } = harness(runner);
    const edit = {
      kind: 'loreft' as const,
      layer: 0,
      rank: 1,
      positions: { first: 0, last: 3 },
      down: new Float32Array(1),
      bias: new Float32Array(1),
      up: new Float32Array(1),
    };
    await submit('a', withCache(200, 1, 'tenant:a', { interventions: [{ ...edit, positions: { first: 0, last: 70 } }] })).done;
    // the last 70 of 200 positions start at 130 (block 2): blocks 0 and 1 are the base model's
    const asked = await submit(
      'b',
      withCache(200, 1, 'tenant:a', { interventions: [{ ...edit, positions: { first: 0, last: 70 } }], returnCoefficients: true }),
    ).done;
    const silent = await submit('c', withCache(200, 1, 'tenant:a', { interventions: [{ ...edit, positions: { first: 0, last: 70 } }] }))
      .done;
    await scheduler.idle();
    expect(asked.cachedTokens).toBe(128);
    expect(silent.cachedTokens).toBe(192);
  });

  it('on a device the blocks share the KV budget, and rows evict them', async () => {
    // rows × their longest budget, and 10 bytes a block, within 600
    const runner = cached(100, 512, { bytes: 600, onDevice: true });
    const { scheduler, submit } = harness(runner);
    await submit('a', withCache(260, 1)).done; // 4 blocks: 40 bytes
    expect(scheduler.stats().prefixCache!.blocks).toBe(4);
    await Promise.all([submit('b', request(200, 90)).done, submit('c', request(200, 90)).done]); // 2 × 290 = 580 bytes
    await scheduler.idle();
    expect(scheduler.stats().prefixCache!.blocks).toBeLessThanOrEqual(2);
    expect(runner.blocks.size).toBe(scheduler.stats().prefixCache!.blocks);
  });
});
