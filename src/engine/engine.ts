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
import { QUANTIZED_GRAPH_VERSION } from '../graph/projection-weights.ts';
import { ropeTables, type RopeTables } from '../graph/rope.ts';
import { cachedGraph } from '../graph/cache.ts';
import type { AppliedEdit, RequestIntervention } from './generation.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { readoutFor, withApplied, type CoefficientReadout } from './coefficients.ts';
import { interventionFeeds, type LayerInterventionFeed } from './intervention-feeds.ts';
import { KvCache, type RowSource } from './kv-cache.ts';
import { loadWeights, type WeightsChoice, type WeightsReport } from '../quant/load.ts';
import { createSession, type SessionOptions } from './session.ts';
import type { StepExecutor, StepSample } from './executor.ts';
import { concatFloats, emptyInterventionFeeds, setInterventions, tokenFeeds, checkPrompt } from './step-feeds.ts';

/**
 * Step-level execution of the decoder graph over a running batch. The scheduler (or a single
 * generation) drives it: `prefill` admits new sequences (their prompts, with interventions),
 * `decode` advances every live sequence by one token, `release` drops one. Decoding is the plain
 * base model: interventions reach generated tokens only through the prompt's KV cache.
 */
export type SequenceId = number;

export interface PrefillInput {
  tokens: readonly number[];
  interventions?: readonly RequestIntervention[];
  /** Return what each intervention did (`applied`, as GenerationResult's). */
  returnCoefficients?: boolean;
  /** Return logits for every prompt position instead of only the last. */
  allLogits?: boolean;
  /**
   * How many leading tokens are the prompt that interventions' positions are counted over
   * (default: all). Recomputing a prompt plus generated tokens keeps the edit on the prompt.
   */
  promptLength?: number;
}

export interface PrefillOutput {
  id: SequenceId;
  /** [vocab] for the last position, or [n, vocab] with `allLogits`. */
  logits: Float32Array;
  /** With `returnCoefficients`: per request item, per intervention, its coefficients. */
  applied?: AppliedEdit[][];
}

export interface EngineOptions extends SessionOptions {
  /** Where built graphs are cached. */
  cacheDir: string;
  /** The graph's attention layout (default: packed where GroupQueryAttention can rotate). */
  attention?: AttentionLayout;
  /** Longer prompts are prefilled in chunks of this many tokens (default 512). */
  prefillChunkTokens?: number;
  /** The weights' format: the checkpoint's floats (default) or quantized at load (src/quant/). */
  weights?: WeightsChoice;
  /** Start-up messages (the quantization cache says whether it was hit). */
  log?: (message: string) => void;
}

const DEFAULT_PREFILL_CHUNK_TOKENS = 512;

export class Engine implements StepExecutor {
  private readonly cache: KvCache;
  private readonly rowOf = new Map<SequenceId, number>();
  private readonly idOf: SequenceId[] = [];
  private nextId = 1;
  /** A decode step's feeds: the empty intervention inputs stay; the rest is set each step. */
  private readonly decodeFeeds: Record<string, ort.Tensor>;
  /** The cache layout `decodeFeeds`' past tensors view; they are rebuilt only when it changes. */
  private pastLayout = '';
  /**
   * A long prompt being prefilled a chunk at a time between decode steps. Its cache row is
   * always the last one, so a decode step's past (the first rows) leaves it out.
   */
  private pending: {
    id: SequenceId;
    input: PrefillInput;
    next: number;
    logits: Float32Array[];
    readout: CoefficientReadout | null;
  } | null = null;
  private readonly fetches: string[];
  /** A prefill's fetches when some row reports its coefficients. */
  private readonly readoutFetches: string[];
  /** Set for the packed layout, whose new keys come back unrotated. */
  private readonly rope: RopeTables | undefined;

  private constructor(
    readonly config: ModelConfig,
    private readonly session: ort.InferenceSession,
    readonly attention: AttentionLayout,
    /** Prompts longer than this are prefilled in chunks of this many tokens. */
    readonly prefillChunkTokens: number,
    /** What the weights are held as, and their bytes. */
    readonly weights: WeightsReport,
  ) {
    this.cache = new KvCache(config);
    this.decodeFeeds = emptyInterventionFeeds(config);
    this.fetches = [OUT.logits];
    for (let l = 0; l < config.numLayers; l++) {
      if (attention === 'packed') this.fetches.push(OUT.qkv(l));
      else this.fetches.push(OUT.newKey(l), OUT.newValue(l));
    }
    this.rope = attention === 'packed' ? ropeTables(config) : undefined;
    this.readoutFetches = [...this.fetches, ...Array.from({ length: config.numLayers }, (_, l) => OUT.ivCoefficients(l))];
  }

  static async create(config: ModelConfig, checkpoint: Checkpoint, opts: EngineOptions): Promise<Engine> {
    const attention = opts.attention ?? defaultAttentionLayout(config);
    const device = opts.device ?? 'cpu';
    const { quantized, report } = await loadWeights(config, checkpoint, opts.weights ?? 'f32', opts.cacheDir, opts.log);
    const key = { version: DECODER_GRAPH_VERSION, config, weights: checkpoint.fingerprint, attention, device };
    const graph = await cachedGraph(
      opts.cacheDir,
      quantized ? { ...key, quantized: quantized.key, graph: QUANTIZED_GRAPH_VERSION } : key,
      () => buildDecoderGraph(config, checkpoint, attention, device, 'host', quantized),
    );
    const session = await createSession(graph.bytes, quantized?.dir ?? checkpoint.dataDir, opts);
    return new Engine(config, session, attention, opts.prefillChunkTokens ?? DEFAULT_PREFILL_CHUNK_TOKENS, report);
  }

  /** Where layer l's new keys and values sit in the step's outputs. */
  private newRows(out: ort.InferenceSession.OnnxValueMapType, l: number): { keys: RowSource; values: RowSource } {
    const { numHeads, numKvHeads, headDim } = this.config;
    const kvDim = numKvHeads * headDim;
    if (this.attention === 'packed') {
      const data = out[OUT.qkv(l)].data as Float32Array;
      const stride = (numHeads + 2 * numKvHeads) * headDim;
      return { keys: { data, offset: numHeads * headDim, stride }, values: { data, offset: numHeads * headDim + kvDim, stride } };
    }
    return {
      keys: { data: out[OUT.newKey(l)].data as Float32Array, offset: 0, stride: kvDim },
      values: { data: out[OUT.newValue(l)].data as Float32Array, offset: 0, stride: kvDim },
    };
  }

  /** Sequences currently holding KV cache rows. */
  get liveSequences(): SequenceId[] {
    return [...this.idOf];
  }

  get kvBytes(): number {
    return this.cache.byteSize;
  }

  private row(id: SequenceId): number {
    const r = this.rowOf.get(id);
    if (r === undefined) throw new Error(`unknown sequence ${id}`);
    return r;
  }

  /**
   * Runs the prompts of new sequences and adds them to the running batch. Prompts up to
   * `prefillChunkTokens` run together in one step; a longer one runs alone, chunk by chunk over
   * its own growing cache, so attention's scratch memory stays bounded by the chunk size (it
   * grows with the square of the tokens run at once).
   */
  async prefill(inputs: readonly PrefillInput[]): Promise<PrefillOutput[]> {
    inputs.forEach((x, i) => checkPrompt(this.config, x.tokens, `inputs.${i}.tokens`));
    const outputs = new Array<PrefillOutput>(inputs.length);
    const short = [...inputs.keys()].filter((i) => inputs[i].tokens.length <= this.prefillChunkTokens);
    if (short.length) (await this.prefillTogether(short.map((i) => inputs[i]))).forEach((o, j) => (outputs[short[j]] = o));
    for (const [i, x] of inputs.entries()) {
      if (x.tokens.length <= this.prefillChunkTokens) continue;
      this.beginPrefill(x);
      let out: PrefillOutput | null = null;
      while (!out) out = await this.continuePrefill();
      outputs[i] = out;
    }
    return outputs;
  }

  /**
   * Starts prefilling one prompt a chunk at a time (`continuePrefill` runs each), so a scheduler
   * can interleave decode steps of the running batch; one such prompt at a time. Its sequence
   * is not part of decode steps until its last chunk has run.
   */
  beginPrefill(input: PrefillInput): SequenceId {
    checkPrompt(this.config, input.tokens, 'tokens');
    if (this.pending) throw new Error(`sequence ${this.pending.id} is still being prefilled`);
    const id = this.addSequence();
    this.cache.reserve(this.cache.rows, input.tokens.length); // room for the whole prompt: one re-layout
    this.pending = { id, input, next: 0, logits: [], readout: readoutFor(input) };
    return id;
  }

  /** Runs the pending prompt's next chunk; returns its output once the last chunk has run. */
  async continuePrefill(): Promise<PrefillOutput | null> {
    const p = this.pending;
    if (!p) throw new Error('no prompt is being prefilled');
    const { config } = this;
    const x = p.input;
    const n = x.tokens.length;
    const start = p.next;
    const end = Math.min(n, start + this.prefillChunkTokens);
    const seq = end - start;
    const wanted = x.allLogits ? seq : end === n ? 1 : 0;
    const feeds = tokenFeeds(1, seq, {
      ids: BigInt64Array.from(x.tokens.slice(start, end), BigInt),
      positions: BigInt64Array.from({ length: seq }, (_, s) => BigInt(start + s)),
      seqlens: Int32Array.of(end - 1),
      total: end,
      logitPairs: BigInt64Array.from({ length: 2 * wanted }, (_, i) => (i % 2 ? BigInt(seq - wanted + (i - 1) / 2) : 0n)),
    });
    for (let l = 0; l < config.numLayers; l++) {
      const past =
        start === 0
          ? { key: new Float32Array(0), value: new Float32Array(0), dims: [1, config.numKvHeads, 0, config.headDim] }
          : this.cache.past(l, 1, this.row(p.id));
      feeds[IN.pastKey(l)] = new ort.Tensor('float32', past.key, past.dims);
      feeds[IN.pastValue(l)] = new ort.Tensor('float32', past.value, past.dims);
    }
    const row = { length: x.promptLength ?? n, interventions: x.interventions ?? [], start };
    const layerFeeds = interventionFeeds([row], seq, config.numLayers, config.hiddenSize);
    this.setInterventions(feeds, layerFeeds);

    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds, p.readout ? this.readoutFetches : this.fetches);
    } catch (err) {
      this.release(p.id);
      throw err;
    }
    if (this.pending !== p) return null; // released while the chunk ran
    const r = this.row(p.id);
    for (let l = 0; l < config.numLayers; l++) {
      const { keys, values } = this.newRows(out, l);
      this.cache.append(l, r, keys, values, 0, seq, seq, this.rope);
    }
    this.cache.advance(r, seq);
    if (wanted) p.logits.push(out[OUT.logits].data as Float32Array);
    p.readout?.record(0, layerFeeds, this.coefficients(out));
    p.next = end;
    if (end < n) return null;
    this.pending = null;
    return withApplied({ id: p.id, logits: p.logits.length === 1 ? p.logits[0] : concatFloats(p.logits) }, p.readout);
  }

  /** The sequence being prefilled a chunk at a time, if any. */
  get prefilling(): SequenceId | null {
    return this.pending?.id ?? null;
  }

  /** Prompts as the rows of one step with no past (shorter rows padded). */
  private async prefillTogether(inputs: readonly PrefillInput[]): Promise<PrefillOutput[]> {
    const { config } = this;
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
    const emptyPast = new ort.Tensor('float32', new Float32Array(0), [b, config.numKvHeads, 0, config.headDim]);
    for (let l = 0; l < config.numLayers; l++) feeds[IN.pastKey(l)] = feeds[IN.pastValue(l)] = emptyPast;
    const rows = inputs.map((x) => ({ length: x.promptLength ?? x.tokens.length, interventions: x.interventions ?? [] }));
    const layerFeeds = interventionFeeds(rows, seq, config.numLayers, config.hiddenSize);
    this.setInterventions(feeds, layerFeeds);
    const readouts = inputs.map(readoutFor);
    const reporting = readouts.some((r) => r !== null);

    const out = await this.session.run(feeds, reporting ? this.readoutFetches : this.fetches);
    if (reporting) {
      const coefficients = this.coefficients(out);
      readouts.forEach((r, row) => r?.record(row, layerFeeds, coefficients));
    }

    const cacheRows = inputs.map(() => this.addSequence());
    this.cache.reserve(this.cache.rows, seq);
    for (let l = 0; l < config.numLayers; l++) {
      const { keys, values } = this.newRows(out, l);
      inputs.forEach((x, r) => this.cache.append(l, this.row(cacheRows[r]), keys, values, r, seq, x.tokens.length, this.rope));
    }
    inputs.forEach((x, r) => this.cache.advance(this.row(cacheRows[r]), x.tokens.length));

    const logits = out[OUT.logits].data as Float32Array;
    const vocab = config.vocabSize;
    let at = 0;
    return inputs.map((x, r) => {
      const n = x.allLogits ? x.tokens.length : 1;
      const slice = logits.slice(at * vocab, (at + n) * vocab);
      at += n;
      return withApplied({ id: cacheRows[r], logits: slice }, readouts[r]);
    });
  }

  /** Each layer's coefficients output of a prefill step that fetched them. */
  private coefficients(out: ort.InferenceSession.OnnxValueMapType): Float32Array[] {
    return Array.from({ length: this.config.numLayers }, (_, l) => out[OUT.ivCoefficients(l)].data as Float32Array);
  }

  private setInterventions(feeds: Record<string, ort.Tensor>, layerFeeds: LayerInterventionFeed[]): void {
    setInterventions(feeds, layerFeeds, this.config.hiddenSize);
  }

  private addSequence(): SequenceId {
    const id = this.nextId++;
    this.rowOf.set(id, this.cache.addRow());
    this.idOf.push(id);
    this.keepPendingLast();
    return id;
  }

  /** Moves the pending prompt's row back to the end after rows were added or removed. */
  private keepPendingLast(): void {
    if (!this.pending) return;
    const a = this.row(this.pending.id);
    const b = this.cache.rows - 1;
    if (a === b) return;
    this.cache.swapRows(a, b);
    [this.idOf[a], this.idOf[b]] = [this.idOf[b], this.idOf[a]];
    this.rowOf.set(this.idOf[a], a);
    this.rowOf.set(this.idOf[b], b);
  }

  /**
   * Feeds one token to every live sequence (all but one still being prefilled) and returns each
   * one's next-token logits. `tokens` must name every one of them: the graph's past is a view
   * of the running batch's rows.
   */
  async decode(tokens: ReadonlyMap<SequenceId, number>): Promise<Map<SequenceId, Float32Array>> {
    const { config } = this;
    const b = this.cache.rows - (this.pending ? 1 : 0);
    if (tokens.size !== b) throw new Error(`decode needs a token for each of the ${b} live sequences, got ${tokens.size}`);
    const lengths = this.cache.lengths; // rows [0, b) are the ones decoding
    let maxLen = 0;
    for (let r = 0; r < b; r++) maxLen = Math.max(maxLen, lengths[r]);
    if (maxLen + 1 > config.maxPositions) throw sequenceReachedContext({ context: config.maxPositions }, 'max_new_tokens');
    this.cache.reserve(this.cache.rows, maxLen + 1);
    const ids = new BigInt64Array(b);
    const positions = new BigInt64Array(b);
    const seqlens = new Int32Array(b);
    for (let r = 0; r < b; r++) {
      const t = tokens.get(this.idOf[r]);
      if (t === undefined) throw new Error(`decode: no token for sequence ${this.idOf[r]}`);
      ids[r] = BigInt(t);
      positions[r] = BigInt(lengths[r]);
      seqlens[r] = lengths[r];
    }
    const feeds = this.decodeFeeds;
    const logitPairs = BigInt64Array.from({ length: 2 * b }, (_, i) => (i % 2 ? 0n : BigInt(i / 2)));
    Object.assign(feeds, tokenFeeds(b, 1, { ids, positions, seqlens, total: maxLen + 1, logitPairs }));
    const layout = `${this.cache.layoutVersion}:${b}`;
    if (this.pastLayout !== layout) {
      for (let l = 0; l < config.numLayers; l++) {
        const past = this.cache.past(l, b);
        feeds[IN.pastKey(l)] = new ort.Tensor('float32', past.key, past.dims);
        feeds[IN.pastValue(l)] = new ort.Tensor('float32', past.value, past.dims);
      }
      this.pastLayout = layout;
    }
    const out = await this.session.run(feeds, this.fetches);
    for (let l = 0; l < config.numLayers; l++) {
      const { keys, values } = this.newRows(out, l);
      for (let r = 0; r < b; r++) this.cache.append(l, r, keys, values, r, 1, 1, this.rope);
    }
    for (let r = 0; r < b; r++) this.cache.advance(r, 1);
    const logits = out[OUT.logits].data as Float32Array;
    const vocab = config.vocabSize;
    const result = new Map<SequenceId, Float32Array>();
    for (let r = 0; r < b; r++) result.set(this.idOf[r], logits.subarray(r * vocab, (r + 1) * vocab));
    return result;
  }

  /** The host cache's logits are already in host memory: every sequence gets them. */
  async decodeStep(tokens: ReadonlyMap<SequenceId, number>): Promise<Map<SequenceId, StepSample>> {
    const logits = await this.decode(tokens);
    return new Map([...logits].map(([id, l]) => [id, { logits: l }]));
  }

  /** Host memory is bounded by the scheduler's tokens in flight. */
  kvFits(): boolean {
    return true;
  }

  /** Drops a sequence from the running batch and frees its cache row. */
  release(id: SequenceId): void {
    const r = this.rowOf.get(id);
    if (r === undefined) return;
    const moved = this.cache.removeRow(r);
    this.rowOf.delete(id);
    if (moved >= 0) {
      const movedId = this.idOf[moved];
      this.idOf[r] = movedId;
      this.rowOf.set(movedId, r);
    }
    this.idOf.pop();
    if (this.pending?.id === id) this.pending = null;
    this.keepPendingLast();
    if (this.cache.rows === 0) this.cache.clear();
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}
