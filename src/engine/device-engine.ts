import * as ort from 'onnxruntime-node';
import { QUANTIZED_GRAPH_VERSION } from '../graph/projection-weights.ts';
import { loadWeights, type WeightsReport } from '../quant/load.ts';
import { deviceOutOfMemory, sequenceReachedContext } from '../errors.ts';
import {
  DECODER_GRAPH_VERSION,
  buildDecoderGraph,
  defaultAttentionLayout,
  decoderInputs as IN,
  decoderOutputs as OUT,
  type AttentionLayout,
} from '../graph/decoder.ts';
import { cachedGraph } from '../graph/cache.ts';
import type { Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { DeviceKvCache, disposeSet, emptySet, setBytes, type KvSet } from './device-kv-cache.ts';
import type { PrefillInput, PrefillOutput, SequenceId } from './engine.ts';
import type { ExecutorOptions, StepExecutor, StepSample } from './executor.ts';
import { readoutFor, withApplied, type CoefficientReadout } from './coefficients.ts';
import { interventionFeeds, type LayerInterventionFeed } from './intervention-feeds.ts';
import { DEFAULT_DEVICE_KV_BUDGET } from './protocol.ts';
import { createSession } from './session.ts';
import { concatFloats, emptyInterventionFeeds, setInterventions, tokenFeeds, checkPrompt } from './step-feeds.ts';

const DEFAULT_PREFILL_CHUNK_TOKENS = 512;

/** Bytes a step handed to the device and took back (host ↔ device traffic through ORT). */
export interface StepTransfer {
  uploaded: number;
  downloaded: number;
  /** Where the step's past key/value feeds were ('gpu-buffer': on the device). */
  pastLocations: Array<ort.Tensor['location']>;
}

/**
 * The engine with its KV cache on the device (the WebGPU provider): the same steps as `Engine`,
 * over `DeviceKvCache`. Each step feeds the device-resident presents of the last one as its
 * past, so what crosses to the device is the step's tokens, positions and interventions, and
 * what comes back is the logits of the sequences that need them or, for greedy ones, the
 * token the graph picked and its logprob.
 */
export class DeviceEngine implements StepExecutor {
  private readonly rowOf = new Map<SequenceId, number>();
  private readonly idOf: SequenceId[] = [];
  private nextId = 1;
  private readonly emptyInterventions: Record<string, ort.Tensor>;
  /** A long prompt prefilled a chunk at a time; its cache joins the batch after its last chunk. */
  private pending: {
    id: SequenceId;
    input: PrefillInput;
    next: number;
    logits: Float32Array[];
    kv: KvSet | null;
    readout: CoefficientReadout | null;
  } | null = null;
  private readonly presents: string[] = [];
  /** The last step's traffic, for tests and metrics. */
  lastTransfer: StepTransfer = { uploaded: 0, downloaded: 0, pastLocations: [] };
  private readonly bytesPerToken: number;

  private constructor(
    readonly config: ModelConfig,
    private readonly session: ort.InferenceSession,
    private readonly cache: DeviceKvCache,
    readonly prefillChunkTokens: number,
    /** Bytes the device KV cache may hold. */
    readonly kvBudget: number,
    /** What the weights are held as, and their bytes. */
    readonly weights: WeightsReport,
  ) {
    this.emptyInterventions = emptyInterventionFeeds(config);
    for (let l = 0; l < config.numLayers; l++) this.presents.push(OUT.presentKey(l));
    for (let l = 0; l < config.numLayers; l++) this.presents.push(OUT.presentValue(l));
    this.bytesPerToken = 2 * config.numLayers * config.numKvHeads * config.headDim * 4;
  }

  static async create(config: ModelConfig, checkpoint: Checkpoint, opts: ExecutorOptions): Promise<DeviceEngine> {
    const attention: AttentionLayout = opts.attention ?? defaultAttentionLayout(config);
    const { quantized, report } = await loadWeights(config, checkpoint, opts.weights ?? 'f32', opts.cacheDir, opts.log);
    const key = { version: DECODER_GRAPH_VERSION, config, weights: checkpoint.fingerprint, attention, device: 'webgpu', cache: 'device' };
    const graph = await cachedGraph(
      opts.cacheDir,
      quantized ? { ...key, quantized: quantized.key, graph: QUANTIZED_GRAPH_VERSION } : key,
      () => buildDecoderGraph(config, checkpoint, attention, 'webgpu', 'device', quantized),
    );
    // Only the presents are named: naming host outputs 'cpu' too makes the binding pre-allocate
    // them at their last shape, which fails when a run's shape differs (ORT 1.30, measured).
    const outputLocations: Record<string, 'cpu' | 'gpu-buffer'> = {};
    for (let l = 0; l < config.numLayers; l++) outputLocations[OUT.presentKey(l)] = outputLocations[OUT.presentValue(l)] = 'gpu-buffer';
    const session = await createSession(graph.bytes, quantized?.dir ?? checkpoint.dataDir, { ...opts, outputLocations });
    const cache = await DeviceKvCache.create(config, opts);
    const chunk = opts.prefillChunkTokens ?? DEFAULT_PREFILL_CHUNK_TOKENS;
    return new DeviceEngine(config, session, cache, chunk, opts.deviceKvBudget ?? DEFAULT_DEVICE_KV_BUDGET, report);
  }

  get liveSequences(): SequenceId[] {
    return this.pending ? [...this.idOf, this.pending.id] : [...this.idOf];
  }

  get prefilling(): SequenceId | null {
    return this.pending?.id ?? null;
  }

  get kvBytes(): number {
    return this.cache.byteSize + (this.pending?.kv ? setBytes(this.pending.kv) : 0);
  }

  /**
   * The cache is padded to its longest row, and a step holds its past and its presents at
   * once: `rows` sequences of `tokens` tokens need 2·rows·tokens·(bytes per token).
   */
  kvFits(rows: number, tokens: number): boolean {
    return 2 * rows * tokens * this.bytesPerToken <= this.kvBudget;
  }

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

  /** Prompts as the rows of one step with no past; their presents join the batch's cache. */
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
    this.setPast(feeds, emptySet(config, b));
    const rows = inputs.map((x) => ({ length: x.promptLength ?? x.tokens.length, interventions: x.interventions ?? [] }));
    const layerFeeds = interventionFeeds(rows, seq, config.numLayers, config.hiddenSize);
    setInterventions(feeds, layerFeeds, config.hiddenSize);
    const readouts = inputs.map(readoutFor);
    const reporting = readouts.some((r) => r !== null);

    const out = await this.run(feeds, logitPairs.length / 2, reporting ? layerFeeds : null);
    if (reporting) {
      const coefficients = this.coefficients(out);
      readouts.forEach((r, row) => r?.record(row, layerFeeds, coefficients));
    }
    await this.cache.append(
      this.presentsOf(out),
      inputs.map((x) => x.tokens.length),
    );
    const ids_ = inputs.map(() => this.addSequence());

    const logits = out[OUT.logits].data as Float32Array;
    const vocab = config.vocabSize;
    let at = 0;
    return inputs.map((x, r) => {
      const n = x.allLogits ? x.tokens.length : 1;
      const slice = logits.slice(at * vocab, (at + n) * vocab);
      at += n;
      return withApplied({ id: ids_[r], logits: slice }, readouts[r]);
    });
  }

  beginPrefill(input: PrefillInput): SequenceId {
    checkPrompt(this.config, input.tokens, 'tokens');
    if (this.pending) throw new Error(`sequence ${this.pending.id} is still being prefilled`);
    const id = this.nextId++;
    this.pending = { id, input, next: 0, logits: [], kv: null, readout: readoutFor(input) };
    return id;
  }

  /** Runs the pending prompt's next chunk over its own device cache; after the last, it joins the batch. */
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
      // at least one row: the device's reductions refuse empty inputs; none comes back unless wanted
      logitPairs: BigInt64Array.from({ length: 2 * Math.max(wanted, 1) }, (_, i) =>
        i % 2 ? BigInt(seq - Math.max(wanted, 1) + (i - 1) / 2) : 0n,
      ),
    });
    this.setPast(feeds, p.kv ?? emptySet(config, 1));
    const row = { length: x.promptLength ?? n, interventions: x.interventions ?? [], start };
    const layerFeeds = interventionFeeds([row], seq, config.numLayers, config.hiddenSize);
    setInterventions(feeds, layerFeeds, config.hiddenSize);

    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.run(feeds, wanted, p.readout ? layerFeeds : null);
    } catch (err) {
      this.release(p.id);
      throw err;
    }
    const presents = this.presentsOf(out);
    if (this.pending !== p) {
      disposeSet(presents); // released while the chunk ran
      return null;
    }
    disposeSet(p.kv);
    p.kv = presents;
    if (wanted) p.logits.push(out[OUT.logits].data as Float32Array);
    p.readout?.record(0, layerFeeds, this.coefficients(out));
    p.next = end;
    if (end < n) return null;
    this.pending = null;
    await this.cache.append(presents, [n]);
    this.rowOf.set(p.id, this.idOf.length);
    this.idOf.push(p.id);
    return withApplied({ id: p.id, logits: p.logits.length === 1 ? p.logits[0] : concatFloats(p.logits) }, p.readout);
  }

  async decode(tokens: ReadonlyMap<SequenceId, number>): Promise<Map<SequenceId, Float32Array>> {
    const all = new Set(tokens.keys());
    const out = await this.decodeStep(tokens, all);
    return new Map([...out].map(([id, s]) => [id, (s as { logits: Float32Array }).logits]));
  }

  async decodeStep(tokens: ReadonlyMap<SequenceId, number>, needLogits: ReadonlySet<SequenceId>): Promise<Map<SequenceId, StepSample>> {
    const { config } = this;
    const b = this.idOf.length;
    if (tokens.size !== b) throw new Error(`decode needs a token for each of the ${b} live sequences, got ${tokens.size}`);
    await this.cache.settle();
    const lengths = this.cache.lengths;
    const maxLen = Math.max(...lengths);
    if (maxLen + 1 > config.maxPositions) throw sequenceReachedContext({ context: config.maxPositions }, 'max_new_tokens');
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
    const logitPairs = BigInt64Array.from({ length: 2 * b }, (_, i) => (i % 2 ? 0n : BigInt(i / 2)));
    const feeds: Record<string, ort.Tensor> = {
      ...this.emptyInterventions,
      ...tokenFeeds(b, 1, { ids, positions, seqlens, total: maxLen + 1, logitPairs }),
    };
    this.setPast(feeds, this.cache.past());
    const logits = this.idOf.some((id) => needLogits.has(id));
    const out = await this.run(feeds, logits ? b : 0, null);
    this.cache.replace(this.presentsOf(out), 1);

    const result = new Map<SequenceId, StepSample>();
    if (logits) {
      const data = out[OUT.logits].data as Float32Array;
      const vocab = config.vocabSize;
      for (let r = 0; r < b; r++) result.set(this.idOf[r], { logits: data.subarray(r * vocab, (r + 1) * vocab) });
    } else {
      const next = out[OUT.nextToken].data as BigInt64Array;
      const logprob = out[OUT.nextLogprob].data as Float32Array;
      for (let r = 0; r < b; r++) result.set(this.idOf[r], { token: Number(next[r]), logprob: logprob[r] });
    }
    return result;
  }

  release(id: SequenceId): void {
    if (this.pending?.id === id) {
      disposeSet(this.pending.kv);
      this.pending = null;
      return;
    }
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
  }

  async close(): Promise<void> {
    disposeSet(this.pending?.kv);
    await this.cache.close();
    await this.session.release();
  }

  private addSequence(): SequenceId {
    const id = this.nextId++;
    this.rowOf.set(id, this.idOf.length);
    this.idOf.push(id);
    return id;
  }

  private setPast(feeds: Record<string, ort.Tensor>, past: KvSet): void {
    const L = this.config.numLayers;
    for (let l = 0; l < L; l++) {
      feeds[IN.pastKey(l)] = past[l];
      feeds[IN.pastValue(l)] = past[L + l];
    }
  }

  private presentsOf(out: ort.InferenceSession.OnnxValueMapType): KvSet {
    return this.presents.map((name) => out[name]);
  }

  /** Each layer's coefficients output of a step run with its feeds to report. */
  private coefficients(out: ort.InferenceSession.OnnxValueMapType): Float32Array[] {
    return Array.from({ length: this.config.numLayers }, (_, l) => out[OUT.ivCoefficients(l)].data as Float32Array);
  }

  /**
   * One decoder run: the presents stay on the device; the first `hostLogitRows` logit rows, the
   * greedy tokens and their logprobs come back, and the edits' coefficients when `report` (the
   * step's intervention feeds) is given. Records the bytes that crossed. A device out of memory
   * is a clear, retryable error, not a crash.
   */
  private async run(
    feeds: Record<string, ort.Tensor>,
    hostLogitRows: number,
    report: readonly LayerInterventionFeed[] | null,
  ): Promise<ort.InferenceSession.OnnxValueMapType> {
    feeds[IN.hostLogitRows] = new ort.Tensor(
      'int64',
      BigInt64Array.from({ length: hostLogitRows }, (_, i) => BigInt(i)),
      [hostLogitRows],
    );
    const coefficientRows = report ? Math.max(0, ...report.map((f) => f.k)) : 0;
    feeds[IN.coefficientRows] = new ort.Tensor('int64', BigInt64Array.of(BigInt(coefficientRows)), [1]);
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds);
    } catch (err) {
      throw deviceError(err);
    }
    let uploaded = 0;
    for (const t of Object.values(feeds)) if (t.location === 'cpu') uploaded += byteLength(t);
    let downloaded = 0;
    for (const t of Object.values(out)) if (t.location === 'cpu') downloaded += byteLength(t);
    const pastLocations = [
      ...new Set(
        Object.entries(feeds)
          .filter(([name]) => name.startsWith('past_'))
          .map(([, t]) => t.location),
      ),
    ];
    this.lastTransfer = { uploaded, downloaded, pastLocations };
    return out;
  }
}

function byteLength(t: ort.Tensor): number {
  return (t.data as ArrayBufferView).byteLength;
}

/** ORT's allocation failures on the device, as an error that says what ran out. */
function deviceError(err: unknown): unknown {
  const message = (err as Error)?.message ?? String(err);
  if (/out of memory|failed to allocate|allocation failed|OOM/i.test(message)) {
    return deviceOutOfMemory({ detail: message }, undefined, { retryAfterSeconds: 1 });
  }
  return err;
}
