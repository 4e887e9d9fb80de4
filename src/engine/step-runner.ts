import { totalmem } from 'node:os';
import * as ort from 'onnxruntime-node';
import { sequenceReachedContext } from '../errors.ts';
import {
  DECODER_GRAPH_VERSION,
  buildDecoderGraph,
  defaultAttentionLayout,
  decoderInputs as IN,
  decoderOutputs as OUT,
  type AttentionLayout,
} from '../graph/decoder.ts';
import { cachedGraph } from '../graph/cache.ts';
import { QUANTIZED_GRAPH_VERSION } from '../graph/projection-weights.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { loadWeights, type WeightsChoice, type WeightsReport } from '../quant/load.ts';
import { readoutFor, withApplied, type CoefficientReadout } from './coefficients.ts';
import { DeviceKvPlacement } from './device-kv-store.ts';
import { HostKvPlacement } from './host-kv-store.ts';
import { interventionFeeds, type LayerInterventionFeed, type PrefillRow } from './intervention-feeds.ts';
import { kvBytesPerToken, type KvBlock, type KvPlacement, type KvStore, type StepOutput } from './kv-store.ts';
import { deviceError, runTransfer, type RunTransfer } from '../runtime/device-runs.ts';
import { createSession, type SessionOptions } from '../runtime/session.ts';
import { checkPrompt, concatFloats, emptyInterventionFeeds, setInterventions, tokenFeeds } from './step-feeds.ts';
import type { BlockId } from '../prefix-cache/block-index.ts';
import { PREFIX_BLOCK_TOKENS } from '../prefix-cache/block-keys.ts';
import type {
  BlockSave,
  ChunkRun,
  KvBudget,
  PrefillInput,
  PrefillOutput,
  SequenceId,
  StepExecutor,
  StepOutputs,
  StepPlan,
  StepSample,
} from './step-plan.ts';

export interface RunnerOptions extends SessionOptions {
  /** Where built graphs are cached. */
  cacheDir: string;
  /** The graph's attention layout (default: packed where GroupQueryAttention can rotate). */
  attention?: AttentionLayout;
  /** Longer prompts are prefilled in chunks of this many tokens (default 512). */
  prefillChunkTokens?: number;
  /** The weights' format: the checkpoint's floats (default) or quantized at load (src/quant/). */
  weights?: WeightsChoice;
  /** Where the KV cache lives (default: on the device under WebGPU, in host memory otherwise). */
  kvCache?: 'host' | 'device';
  /** Bytes the host KV cache may hold at a step's peak (default 1 GiB; the server derives its own from the machine). */
  kvBudget?: number;
  /** Bytes the device KV cache may hold at a step's peak (default 1 GiB), the prefix cache's blocks included (rows evict them). */
  deviceKvBudget?: number;
  /** Bytes the prefix cache's blocks may hold (0: off; default a quarter of the KV budget, at most 1 GiB). */
  prefixCacheBytes?: number;
  /** Start-up messages (the quantization cache says whether it was hit). */
  log?: (message: string) => void;
}

export const DEFAULT_PREFILL_CHUNK_TOKENS = 512;
/** The device KV budget unless told otherwise (--device-kv-budget). */
export const DEFAULT_KV_BUDGET = 1 << 30;

/** The host KV budget unless told otherwise (--kv-budget): half of what the machine (or its cgroup) has beyond the weights. */
export function defaultHostKvBudget(weightBytes: number): number {
  const constrained = process.constrainedMemory();
  const memory = constrained > 0 && constrained < totalmem() ? constrained : totalmem();
  return Math.max(64 * 2 ** 20, Math.floor((memory - weightBytes) / 2));
}

/** A prompt prefilled over its own cache, a run per step (a long one, or one whose prefix was cached). */
interface PendingPrompt {
  seq: SequenceId;
  store: KvStore;
  logits: Float32Array[];
  readout: CoefficientReadout | null;
}

/**
 * Executes the scheduler's steps (src/engine/step-plan.ts) with the decoder graph over a KV
 * store: the decoding batch's rows, a fresh store for prompts prefilled together (it joins the
 * batch), and one for the long prompt prefilled a chunk per step. Where the cache lives (host
 * slabs or device tensors) is the store's business and the graph variant's; the runner's steps
 * are the same. On the device the graph also picks greedy tokens, so only the rows that sample
 * on the host download their logits.
 *
 * Tests, benches and single generations drive it directly through `prefill`, `decode`,
 * `decodeStep`, `beginPrefill`/`continuePrefill` and `release`, each one plan executed.
 */
export class StepRunner implements StepExecutor {
  private readonly batch: KvStore;
  private readonly rowOf = new Map<SequenceId, number>();
  private readonly idOf: SequenceId[] = [];
  private nextId = 1;
  private readonly pending = new Map<SequenceId, PendingPrompt>();
  /** Prefix-cache blocks, by the ids the scheduler gave them. */
  private readonly blocks = new Map<BlockId, KvBlock>();
  /** The prompt `beginPrefill` started, for `continuePrefill`. */
  private manualChunk: { seq: SequenceId; input: PrefillInput; next: number } | null = null;
  /** A decode step's feeds: the empty intervention inputs stay, the rest is set each step. */
  private readonly decodeFeeds: Record<string, ort.Tensor>;
  /** Whether the graph takes the multi-token flag (its prefill runs attend in plain operators: WebGPU). */
  private readonly multiTokenFlag: boolean;
  /** The host variant's fetches without and with the coefficients (the device variant fetches every output). */
  private readonly fetches: { plain: string[]; readout: string[] } | null;
  /** The last step's traffic, for tests and metrics. */
  lastTransfer: RunTransfer = { uploaded: 0, downloaded: 0, pastLocations: [] };
  readonly kvBudget: KvBudget;
  readonly prefixCache: { budgetBytes: number; blockBytes: number } | null;

  private constructor(
    readonly config: ModelConfig,
    private readonly session: ort.InferenceSession,
    private readonly placement: KvPlacement,
    readonly prefillChunkTokens: number,
    kvBudget: number,
    prefixCacheBytes: number,
    /** What the weights are held as, and their bytes. */
    readonly weights: WeightsReport,
  ) {
    this.batch = placement.createStore(0);
    this.decodeFeeds = emptyInterventionFeeds(config);
    const blockBytes = PREFIX_BLOCK_TOKENS * kvBytesPerToken(config);
    this.prefixCache = prefixCacheBytes >= blockBytes ? { budgetBytes: prefixCacheBytes, blockBytes } : null;
    this.multiTokenFlag = session.inputNames.includes(IN.multiToken);
    this.kvBudget = { bytes: kvBudget, onDevice: placement.side === 'device' };
    if (placement.fetches) {
      const plain = [OUT.logits, ...placement.fetches];
      this.fetches = { plain, readout: [...plain, ...Array.from({ length: config.numLayers }, (_, l) => OUT.ivCoefficients(l))] };
    } else {
      this.fetches = null;
    }
  }

  static async create(config: ModelConfig, checkpoint: Checkpoint, opts: RunnerOptions): Promise<StepRunner> {
    const attention = opts.attention ?? defaultAttentionLayout(config);
    const device = opts.device ?? 'cpu';
    const side = opts.kvCache ?? (device === 'webgpu' ? 'device' : 'host');
    const placement = side === 'device' ? await DeviceKvPlacement.create(config, opts) : new HostKvPlacement(config, attention);
    const { quantized, report } = await loadWeights(config, checkpoint, opts.weights ?? 'f32', opts.cacheDir, opts.log);
    const key = {
      version: DECODER_GRAPH_VERSION,
      config,
      weights: checkpoint.fingerprint,
      attention,
      device,
      ...(side === 'device' ? { cache: side } : {}),
    };
    const graph = await cachedGraph(
      opts.cacheDir,
      quantized ? { ...key, quantized: quantized.key, graph: QUANTIZED_GRAPH_VERSION } : key,
      () => buildDecoderGraph(config, checkpoint, attention, device, side, quantized),
    );
    const session = await createSession(graph.bytes, quantized?.dir ?? checkpoint.dataDir, {
      ...opts,
      outputLocations: placement.outputLocations,
    });
    const chunk = opts.prefillChunkTokens ?? DEFAULT_PREFILL_CHUNK_TOKENS;
    const budget = side === 'device' ? (opts.deviceKvBudget ?? DEFAULT_KV_BUDGET) : (opts.kvBudget ?? defaultHostKvBudget(report.bytes));
    const prefix = opts.prefixCacheBytes ?? Math.min(2 ** 30, Math.floor(budget / 4));
    return new StepRunner(config, session, placement, chunk, budget, prefix, report);
  }

  /** Sequences holding KV rows: the batch's and those being prefilled over a cache of their own. */
  get liveSequences(): SequenceId[] {
    const manual = this.manualChunk && !this.pending.has(this.manualChunk.seq) ? [this.manualChunk.seq] : [];
    return [...this.idOf, ...this.pending.keys(), ...manual];
  }

  /** The sequence `beginPrefill` started, or else one being prefilled a run per step, if any. */
  get prefilling(): SequenceId | null {
    return this.manualChunk?.seq ?? this.pending.keys().next().value ?? null;
  }

  /** Bytes the rows' caches hold (the prefix cache's blocks apart). */
  get kvBytes(): number {
    let bytes = this.batch.byteSize;
    for (const p of this.pending.values()) bytes += p.store.byteSize;
    return bytes;
  }

  kvStepBytes(rows: number, tokens: number): number {
    return this.placement.stepBytes(rows, tokens);
  }

  newSequenceId(): SequenceId {
    return this.nextId++;
  }

  /**
   * Runs a step: releases first, then one decode run over the batch, the new prompts together,
   * the long prompt's next chunk. A part that fails leaves its sequences without KV rows and
   * is reported; the other parts still run.
   */
  async execute(plan: StepPlan): Promise<StepOutputs> {
    const outputs: StepOutputs = { decoded: new Map(), prefilled: new Map(), failed: [], saved: [] };
    for (const seq of plan.release) this.release(seq);
    for (const id of plan.dropBlocks) {
      this.blocks.get(id)?.dispose();
      this.blocks.delete(id);
    }
    if (plan.decode.length) {
      try {
        outputs.decoded = await this.decodeBatch(plan.decode);
      } catch (error) {
        const seqs = plan.decode.map((d) => d.seq);
        seqs.forEach((s) => this.release(s));
        outputs.failed.push({ seqs, error });
      }
    }
    if (plan.prefill.length) {
      try {
        for (const out of await this.prefillTogether(plan.prefill, outputs.saved)) outputs.prefilled.set(out.id, out);
      } catch (error) {
        outputs.failed.push({ seqs: plan.prefill.map((p) => p.seq), error });
      }
    }
    for (const chunk of plan.chunks) {
      try {
        const out = await this.runChunk(chunk, outputs.saved);
        if (out) outputs.prefilled.set(out.id, out);
      } catch (error) {
        this.release(chunk.seq);
        outputs.failed.push({ seqs: [chunk.seq], error });
      }
    }
    return outputs;
  }

  /** Prompts as the rows of one run with no past (shorter rows padded); they join the batch. */
  private async prefillTogether(rows: StepPlan['prefill'], saved: BlockId[]): Promise<PrefillOutput[]> {
    rows.forEach(({ input }, i) => checkPrompt(this.config, input.tokens, `inputs.${i}.tokens`));
    const inputs = rows.map((r) => r.input);
    const b = inputs.length;
    const seq = Math.max(...inputs.map((x) => x.tokens.length));
    const ids = new BigInt64Array(b * seq);
    const positions = new BigInt64Array(b * seq);
    const seqlens = new Int32Array(b);
    const logitPairs: bigint[] = [];
    inputs.forEach((x, r) => {
      x.tokens.forEach((t, s) => (ids[r * seq + s] = BigInt(t)));
      for (let s = 0; s < seq; s++) positions[r * seq + s] = BigInt(s);
      seqlens[r] = x.tokens.length - 1;
      const n = x.tokens.length;
      for (let s = x.allLogits ? 0 : n - 1; s < n; s++) logitPairs.push(BigInt(r), BigInt(s));
    });
    const feeds = tokenFeeds(b, seq, { ids, positions, seqlens, total: seq, logitPairs: BigInt64Array.from(logitPairs) });
    const fresh = this.placement.createStore(b);
    await fresh.feedPast(feeds);
    const prefillRows = inputs.map((x) => ({ length: x.promptLength ?? x.tokens.length, interventions: x.interventions ?? [] }));
    const layerFeeds = this.setInterventions(feeds, prefillRows, seq);
    const readouts = inputs.map(readoutFor);
    const reporting = readouts.some((r) => r !== null);
    const pairs = logitPairs.length / 2;
    let out: StepOutput;
    try {
      out = await this.run(feeds, range(pairs), reporting ? layerFeeds : null);
      if (reporting) {
        const coefficients = this.coefficients(out);
        readouts.forEach((r, row) => r?.record(row, layerFeeds, coefficients));
      }
      fresh.keep(
        out,
        seq,
        inputs.map((x) => x.tokens.length),
      );
      for (const [r, row] of rows.entries()) await this.saveBlocks(fresh, r, row.save, row.input.tokens.length, saved);
    } catch (err) {
      fresh.clear();
      throw err;
    }
    await this.batch.adopt(fresh).catch((err) => {
      fresh.clear();
      throw err;
    });
    rows.forEach(({ seq: id }) => this.addRow(id));
    const logits = this.hostLogits(out, range(pairs));
    let at = 0;
    return rows.map(({ seq: id, input: x }, r) => {
      const n = x.allLogits ? x.tokens.length : 1;
      const slice = n === 1 ? logits[at].slice() : concatFloats(logits.slice(at, at + n));
      at += n;
      return withApplied({ id, logits: slice }, readouts[r]);
    });
  }

  /**
   * Runs tokens [start, end) of a prompt over its own cache, made on its first run (with its
   * cached prefix's blocks, which it starts after); after its last run it joins the batch.
   */
  private async runChunk(c: ChunkRun, saved: BlockId[]): Promise<PrefillOutput | null> {
    const x = c.input;
    const n = x.tokens.length;
    let p = this.pending.get(c.seq);
    if (!p) {
      checkPrompt(this.config, x.tokens, 'tokens');
      const blocks = (c.cached ?? []).map((id) => this.blocks.get(id) ?? missingBlock(id));
      if (c.start !== blocks.reduce((t, b) => t + b.tokens, 0))
        throw new Error(`sequence ${c.seq} starts at ${c.start}, not after its cached blocks`);
      const store = blocks.length ? await this.placement.storeFromBlocks(blocks, n) : this.placement.createStore(1);
      p = { seq: c.seq, store, logits: [], readout: readoutFor(x) };
      this.pending.set(c.seq, p);
    }
    if (p.store.lengths[0] !== c.start) throw new Error(`sequence ${c.seq} is at token ${p.store.lengths[0]}, not ${c.start}`);
    const seq = c.end - c.start;
    const wanted = x.allLogits ? seq : c.end === n ? 1 : 0;
    // at least one logit pair: the device's reductions refuse empty inputs; none comes back unless wanted
    const pairs = Math.max(wanted, 1);
    const feeds = tokenFeeds(1, seq, {
      ids: BigInt64Array.from(x.tokens.slice(c.start, c.end), BigInt),
      positions: BigInt64Array.from({ length: seq }, (_, s) => BigInt(c.start + s)),
      seqlens: Int32Array.of(c.end - 1),
      total: c.end,
      logitPairs: BigInt64Array.from({ length: 2 * pairs }, (_, i) => (i % 2 ? BigInt(seq - pairs + (i - 1) / 2) : 0n)),
    });
    await p.store.feedPast(feeds);
    const row = { length: x.promptLength ?? n, interventions: x.interventions ?? [], start: c.start };
    const layerFeeds = this.setInterventions(feeds, [row], seq);
    const out = await this.run(feeds, range(wanted), p.readout ? layerFeeds : null);
    p.store.keep(out, seq, [seq]);
    if (wanted) p.logits.push(concatFloats(this.hostLogits(out, range(wanted))));
    p.readout?.record(0, layerFeeds, this.coefficients(out));
    await this.saveBlocks(p.store, 0, c.save, c.end, saved);
    if (c.end < n) return null;
    this.pending.delete(c.seq);
    await this.batch.adopt(p.store);
    this.addRow(p.seq);
    return withApplied({ id: p.seq, logits: p.logits.length === 1 ? p.logits[0] : concatFloats(p.logits) }, p.readout);
  }

  /** Keeps the blocks of `save` that row `row` of `store` now holds whole (it holds tokens up to `upTo`). */
  private async saveBlocks(
    store: KvStore,
    row: number,
    save: readonly BlockSave[] | undefined,
    upTo: number,
    saved: BlockId[],
  ): Promise<void> {
    for (const { index, id } of save ?? []) {
      const start = index * PREFIX_BLOCK_TOKENS;
      if (this.blocks.has(id) || start + PREFIX_BLOCK_TOKENS > upTo) continue;
      this.blocks.set(id, await store.exportBlock(row, start, PREFIX_BLOCK_TOKENS));
      saved.push(id);
    }
  }

  /** One token for every row of the batch; rows that asked get logits, the others may get the device's greedy pick. */
  private async decodeBatch(rows: StepPlan['decode']): Promise<Map<SequenceId, StepSample>> {
    const { config } = this;
    const b = this.idOf.length;
    if (rows.length !== b) throw new Error(`decode needs a token for each of the ${b} live sequences, got ${rows.length}`);
    const lengths = this.batch.lengths;
    const maxLen = Math.max(...lengths);
    if (maxLen + 1 > config.maxPositions) throw sequenceReachedContext({ context: config.maxPositions }, 'max_new_tokens');
    const ids = new BigInt64Array(b);
    const positions = new BigInt64Array(b);
    const seqlens = new Int32Array(b);
    const logitRows: number[] = [];
    for (const { seq, token, logits } of rows) {
      const r = this.row(seq);
      ids[r] = BigInt(token);
      positions[r] = BigInt(lengths[r]);
      seqlens[r] = lengths[r];
      if (logits || this.fetches) logitRows.push(r); // host logits come back anyway
    }
    logitRows.sort((x, y) => x - y);
    const logitPairs = BigInt64Array.from({ length: 2 * b }, (_, i) => (i % 2 ? 0n : BigInt(i / 2)));
    // one feeds object for every decode step: its empty intervention inputs stay, the rest is set
    const feeds = Object.assign(this.decodeFeeds, tokenFeeds(b, 1, { ids, positions, seqlens, total: maxLen + 1, logitPairs }));
    await this.batch.feedPast(feeds);
    const out = await this.run(feeds, logitRows, null);
    this.batch.keep(out, 1, new Array<number>(b).fill(1));

    const result = new Map<SequenceId, StepSample>();
    const logits = this.hostLogits(out, logitRows);
    logitRows.forEach((r, i) => result.set(this.idOf[r], { logits: logits[i] }));
    if (logitRows.length < b) {
      const next = out[OUT.nextToken].data as BigInt64Array;
      const logprob = out[OUT.nextLogprob].data as Float32Array;
      for (let r = 0; r < b; r++) if (!result.has(this.idOf[r])) result.set(this.idOf[r], { token: Number(next[r]), logprob: logprob[r] });
    }
    return result;
  }

  /** Sets a step's intervention inputs; returns them per layer (a readout reads the edits from them). */
  private setInterventions(feeds: Record<string, ort.Tensor>, rows: PrefillRow[], seq: number): LayerInterventionFeed[] {
    const layerFeeds = interventionFeeds(rows, seq, this.config.numLayers, this.config.hiddenSize);
    setInterventions(feeds, layerFeeds, this.config.hiddenSize);
    return layerFeeds;
  }

  /**
   * One decoder run. `logitRows` are the logit pairs (rows of `logit_index`) whose logits the
   * host needs; `report`, the step's intervention feeds when some row reports its coefficients.
   * A graph that takes the multi-token flag (WebGPU's) is told whether the run carries more than
   * one token per row: those runs attend in plain operators (src/graph/matmul-attention.ts).
   * The host variant fetches the new keys and values and every logit row; the device variant
   * returns every output, its presents left on the device and only the chosen logit rows and
   * coefficient rows downloaded. Records the bytes that crossed.
   */
  private async run(
    feeds: Record<string, ort.Tensor>,
    logitRows: number[],
    report: readonly LayerInterventionFeed[] | null,
  ): Promise<StepOutput> {
    if (this.multiTokenFlag) {
      const multi = feeds[IN.inputIds].dims[1] > 1;
      feeds[IN.multiToken] = new ort.Tensor('bool', Uint8Array.of(multi ? 1 : 0), []);
    }
    if (!this.fetches) {
      feeds[IN.hostLogitRows] = new ort.Tensor('int64', BigInt64Array.from(logitRows, BigInt), [logitRows.length]);
      const coefficientRows = report ? Math.max(0, ...report.map((f) => f.k)) : 0;
      feeds[IN.coefficientRows] = new ort.Tensor('int64', BigInt64Array.of(BigInt(coefficientRows)), [1]);
    }
    let out: StepOutput;
    try {
      out = this.fetches
        ? await this.session.run(feeds, report ? this.fetches.readout : this.fetches.plain)
        : await this.session.run(feeds);
    } catch (err) {
      throw this.fetches ? err : deviceError(err);
    }
    if (!this.fetches) this.lastTransfer = runTransfer(feeds, out); // host ↔ device traffic: only a device has any
    return out;
  }

  /** The logits of logit pairs `rows`: the host variant returns every pair, the device variant only those asked for. */
  private hostLogits(out: StepOutput, rows: readonly number[]): Float32Array[] {
    const data = out[OUT.logits].data as Float32Array;
    const vocab = this.config.vocabSize;
    return rows.map((r, i) => {
      const at = this.fetches ? r : i;
      return data.subarray(at * vocab, (at + 1) * vocab);
    });
  }

  /** Each layer's coefficients output of a step run with its feeds to report. */
  private coefficients(out: StepOutput): Float32Array[] {
    return Array.from({ length: this.config.numLayers }, (_, l) => out[OUT.ivCoefficients(l)].data as Float32Array);
  }

  private row(id: SequenceId): number {
    const r = this.rowOf.get(id);
    if (r === undefined) throw new Error(`unknown sequence ${id}`);
    return r;
  }

  private addRow(id: SequenceId): void {
    this.rowOf.set(id, this.idOf.length);
    this.idOf.push(id);
  }

  /** Drops a sequence (decoding or being prefilled) and frees its KV rows; unknown ones are ignored. */
  release(id: SequenceId): void {
    const pending = this.pending.get(id);
    if (pending) {
      pending.store.clear();
      this.pending.delete(id);
    }
    if (this.manualChunk?.seq === id) this.manualChunk = null;
    const r = this.rowOf.get(id);
    if (r === undefined) return;
    const moved = this.batch.removeRow(r);
    this.rowOf.delete(id);
    if (moved >= 0) {
      const movedId = this.idOf[moved];
      this.idOf[r] = movedId;
      this.rowOf.set(movedId, r);
    }
    this.idOf.pop();
  }

  async close(): Promise<void> {
    for (const p of this.pending.values()) p.store.clear();
    for (const b of this.blocks.values()) b.dispose();
    this.batch.clear();
    await this.placement.close();
    await this.session.release();
  }

  // Direct use: each call one plan, failures thrown.

  /** Prefills prompts and adds them to the batch: short ones together, long ones chunk by chunk. */
  async prefill(inputs: readonly PrefillInput[]): Promise<PrefillOutput[]> {
    inputs.forEach((x, i) => checkPrompt(this.config, x.tokens, `inputs.${i}.tokens`));
    const seqs = inputs.map(() => this.newSequenceId());
    const short = inputs.flatMap((input, i) => (input.tokens.length <= this.prefillChunkTokens ? [{ seq: seqs[i], input }] : []));
    const outputs = new Map<SequenceId, PrefillOutput>();
    if (short.length) for (const [id, out] of (await this.executeOrThrow({ ...NO_WORK, prefill: short })).prefilled) outputs.set(id, out);
    for (const [i, input] of inputs.entries()) {
      if (input.tokens.length <= this.prefillChunkTokens) continue;
      for (let start = 0; start < input.tokens.length; start += this.prefillChunkTokens) {
        const end = Math.min(input.tokens.length, start + this.prefillChunkTokens);
        const out = (await this.executeOrThrow({ ...NO_WORK, chunks: [{ seq: seqs[i], input, start, end }] })).prefilled.get(seqs[i]);
        if (out) outputs.set(seqs[i], out);
      }
    }
    return seqs.map((s) => outputs.get(s)!);
  }

  /** Starts prefilling one prompt a chunk at a time (`continuePrefill` runs each chunk). */
  beginPrefill(input: PrefillInput): SequenceId {
    checkPrompt(this.config, input.tokens, 'tokens');
    if (this.manualChunk) throw new Error(`sequence ${this.manualChunk.seq} is still being prefilled`);
    this.manualChunk = { seq: this.newSequenceId(), input, next: 0 };
    return this.manualChunk.seq;
  }

  /** Runs the started prompt's next chunk; returns its output once the last chunk has run. */
  async continuePrefill(): Promise<PrefillOutput | null> {
    const m = this.manualChunk;
    if (!m) throw new Error('no prompt is being prefilled');
    const end = Math.min(m.input.tokens.length, m.next + this.prefillChunkTokens);
    const chunk = { seq: m.seq, input: m.input, start: m.next, end };
    m.next = end;
    const out = (await this.executeOrThrow({ ...NO_WORK, chunks: [chunk] })).prefilled.get(m.seq) ?? null;
    if (out) this.manualChunk = null;
    return out;
  }

  /** One token for every batch row; every row's logits. */
  async decode(tokens: ReadonlyMap<SequenceId, number>): Promise<Map<SequenceId, Float32Array>> {
    const out = await this.decodeStep(tokens, new Set(tokens.keys()));
    return new Map([...out].map(([id, s]) => [id, (s as { logits: Float32Array }).logits]));
  }

  /** One token for every batch row; rows in `needLogits` get logits, the others may get the device's greedy pick. */
  async decodeStep(tokens: ReadonlyMap<SequenceId, number>, needLogits: ReadonlySet<SequenceId>): Promise<Map<SequenceId, StepSample>> {
    const decode = [...tokens].map(([seq, token]) => ({ seq, token, logits: needLogits.has(seq) }));
    return (await this.executeOrThrow({ ...NO_WORK, decode })).decoded;
  }

  private async executeOrThrow(plan: StepPlan): Promise<StepOutputs> {
    const outputs = await this.execute(plan);
    if (outputs.failed.length) throw outputs.failed[0].error;
    return outputs;
  }
}

const NO_WORK: StepPlan = { release: [], dropBlocks: [], decode: [], prefill: [], chunks: [] };

function missingBlock(id: BlockId): never {
  throw new Error(`prefix-cache block ${id} is not held`);
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
