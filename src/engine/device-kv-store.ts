import * as ort from 'onnxruntime-node';
import { decoderInputs as IN, decoderOutputs as OUT } from '../graph/decoder.ts';
import { appendGraph, joinGraph, selectGraph, sliceGraph } from '../graph/kv-cache-graphs.ts';
import type { ModelConfig } from '../model/config.ts';
import { kvBytesPerToken, type KvBlock, type KvPlacement, type KvShape, type KvStore, type StepOutput } from './kv-store.ts';
import { createSession, type SessionOptions } from '../runtime/session.ts';

/**
 * The KV cache on the device (ORT's WebGPU provider).
 *
 * A store holds, per layer, a key and a value tensor [rows, kv_heads, length, head_dim] (BNSH,
 * what GroupQueryAttention reads as past and returns as present); row r is valid up to its own
 * `lengths[r]`, the rest is padding GroupQueryAttention never reads (it overwrites it as the
 * row grows). The decoder's presents replace the tensors after each step; rows join and leave
 * through two small graphs run on the device (`join`: Pad + Concat, `select`: Gather + Slice),
 * so the past never crosses to the host. Superseded tensors are disposed here: the device frees
 * a buffer only when asked.
 */
type KvSet = ort.Tensor[]; // keys of layers 0..L-1, then values of layers 0..L-1

export class DeviceKvPlacement implements KvPlacement {
  readonly side = 'device' as const;
  readonly outputLocations: Record<string, 'gpu-buffer'> = {};
  readonly fetches = null;

  private constructor(
    private readonly config: ModelConfig,
    private readonly graphs: DeviceKvGraphs,
  ) {
    // Only the presents are named: naming host outputs 'cpu' too makes the binding pre-allocate
    // them at their last shape, which fails when a run's shape differs (ORT 1.30, measured; 1.29 the same: the WebGPU tests pass on it).
    for (let l = 0; l < config.numLayers; l++) {
      this.outputLocations[OUT.presentKey(l)] = this.outputLocations[OUT.presentValue(l)] = 'gpu-buffer';
    }
  }

  static async create(config: ModelConfig, opts: SessionOptions): Promise<DeviceKvPlacement> {
    const n = 2 * config.numLayers;
    const onDevice = {
      ...opts,
      outputLocations: Object.fromEntries(Array.from({ length: n }, (_, i) => [`y.${i}`, 'gpu-buffer' as const])),
    };
    const [join, select, slice, append] = await Promise.all(
      [joinGraph, selectGraph, sliceGraph, appendGraph].map((graph) => createSession(graph(config, n), '.', onDevice)),
    );
    return new DeviceKvPlacement(config, { join, select, slice, append });
  }

  createStore(rows: number): DeviceKvStore {
    return new DeviceKvStore(this.config, rows, this.graphs);
  }

  /** The blocks' tensors appended along the length axis into new ones (the blocks stay the cache's). */
  async storeFromBlocks(blocks: readonly KvBlock[]): Promise<DeviceKvStore> {
    const store = this.createStore(1);
    let set: KvSet = emptySet(this.config, 1);
    for (const block of blocks) {
      if (!(block instanceof DeviceKvBlock)) throw new Error('a device KV store loads only device blocks');
      const feeds: Record<string, ort.Tensor> = {};
      set.forEach((t, i) => (feeds[`a.${i}`] = t));
      block.set.forEach((t, i) => (feeds[`b.${i}`] = t));
      const next = outputsOf(await this.graphs.append.run(feeds), set.length);
      disposeSet(set);
      set = next;
    }
    store.load(
      set,
      blocks.reduce((n, b) => n + b.tokens, 0),
    );
    return store;
  }

  /** The cache is padded to its longest row, and a step holds its past and its presents at once. */
  stepBytes(rows: number, tokens: number): number {
    return 2 * rows * tokens * kvBytesPerToken(this.config);
  }

  async close(): Promise<void> {
    await Promise.all(Object.values(this.graphs).map((g) => g.release()));
  }
}

/** The small graphs that move rows on the device (see the graphs at the end of this file). */
interface DeviceKvGraphs {
  join: ort.InferenceSession;
  select: ort.InferenceSession;
  slice: ort.InferenceSession;
  append: ort.InferenceSession;
}

/** Keys and values of some tokens on the device: per layer [1, kv_heads, tokens, head_dim]. */
export class DeviceKvBlock implements KvBlock {
  constructor(
    readonly tokens: number,
    readonly set: KvSet,
  ) {}

  dispose(): void {
    disposeSet(this.set);
  }
}

export class DeviceKvStore implements KvStore {
  /** The rows' tensors, or null while no step has written them. */
  private set: KvSet | null = null;
  readonly lengths: number[];
  /** Which row of the device tensors each row is, until `settle` rearranges them. */
  private order: number[];

  constructor(
    private readonly shape: KvShape,
    rows: number,
    private readonly graphs: DeviceKvGraphs,
  ) {
    this.lengths = new Array<number>(rows).fill(0);
    this.order = this.lengths.map((_, i) => i);
  }

  get byteSize(): number {
    return this.set ? this.set.reduce((n, t) => n + t.dims.reduce((a, b) => a * b, 1) * 4, 0) : 0;
  }

  async feedPast(feeds: Record<string, ort.Tensor>): Promise<void> {
    await this.settle();
    const L = this.shape.numLayers;
    const past = this.set ?? emptySet(this.shape, this.lengths.length);
    for (let l = 0; l < L; l++) {
      feeds[IN.pastKey(l)] = past[l];
      feeds[IN.pastValue(l)] = past[L + l];
    }
  }

  /** The step's presents become the rows' tensors. */
  keep(out: StepOutput, _seq: number, grew: readonly number[]): void {
    const L = this.shape.numLayers;
    const presents = [
      ...Array.from({ length: L }, (_, l) => out[OUT.presentKey(l)]),
      ...Array.from({ length: L }, (_, l) => out[OUT.presentValue(l)]),
    ];
    disposeSet(this.set);
    this.set = presents;
    grew.forEach((n, r) => (this.lengths[r] += n));
  }

  async adopt(other: KvStore): Promise<void> {
    if (!(other instanceof DeviceKvStore)) throw new Error('a device KV store adopts only device rows');
    await Promise.all([this.settle(), other.settle()]);
    if (!this.set) {
      this.set = other.set;
    } else if (other.set) {
      const pad = (t: ort.Tensor, to: number) => padsTensor(to - t.dims[2]);
      const length = Math.max(this.set[0].dims[2], other.set[0].dims[2]);
      const feeds: Record<string, ort.Tensor> = { pad_a: pad(this.set[0], length), pad_b: pad(other.set[0], length) };
      this.set.forEach((t, i) => (feeds[`a.${i}`] = t));
      other.set.forEach((t, i) => (feeds[`b.${i}`] = t));
      const joined = outputsOf(await this.graphs.join.run(feeds), this.set.length);
      disposeSet(this.set);
      disposeSet(other.set);
      this.set = joined;
    }
    for (const n of other.lengths) {
      this.order.push(this.lengths.length);
      this.lengths.push(n);
    }
    other.set = null;
    other.lengths.length = 0;
    other.order = [];
  }

  /** A one-row store's contents: `set` holding `tokens` tokens (its prefix from the cache). */
  load(set: KvSet, tokens: number): void {
    disposeSet(this.set);
    this.set = set;
    this.lengths[0] = tokens;
  }

  async exportBlock(row: number, start: number, tokens: number): Promise<DeviceKvBlock> {
    await this.settle();
    const feeds: Record<string, ort.Tensor> = {
      starts: new ort.Tensor('int64', BigInt64Array.of(BigInt(row), BigInt(start)), [2]),
      ends: new ort.Tensor('int64', BigInt64Array.of(BigInt(row + 1), BigInt(start + tokens)), [2]),
    };
    this.set!.forEach((t, i) => (feeds[`x.${i}`] = t));
    return new DeviceKvBlock(tokens, outputsOf(await this.graphs.slice.run(feeds), this.set!.length));
  }

  /** The device tensors are rearranged by the next `settle`, so rows leaving between two steps cost one small graph run together. */
  removeRow(r: number): number {
    const last = this.lengths.length - 1;
    if (r !== last) {
      this.lengths[r] = this.lengths[last];
      this.order[r] = this.order[last];
    }
    this.lengths.pop();
    this.order.pop();
    if (this.lengths.length === 0) this.clear();
    return r === last ? -1 : last;
  }

  /** Applies the removals since the last step: picks the rows still live, cut to the longest. */
  private async settle(): Promise<void> {
    if (!this.set || (this.order.length === this.set[0].dims[0] && this.order.every((p, i) => p === i))) return;
    const length = Math.max(...this.lengths);
    const feeds: Record<string, ort.Tensor> = {
      rows: new ort.Tensor('int64', BigInt64Array.from(this.order, BigInt), [this.order.length]),
      length: new ort.Tensor('int64', BigInt64Array.of(BigInt(length)), [1]),
    };
    this.set.forEach((t, i) => (feeds[`x.${i}`] = t));
    const selected = outputsOf(await this.graphs.select.run(feeds), this.set.length);
    disposeSet(this.set);
    this.set = selected;
    this.order = this.lengths.map((_, i) => i);
  }

  clear(): void {
    disposeSet(this.set);
    this.set = null;
    this.lengths.length = 0;
    this.order = [];
  }
}

function disposeSet(set: KvSet | null): void {
  for (const t of set ?? []) if (t.location === 'gpu-buffer') t.dispose();
}

function emptySet(shape: KvShape, rows: number): KvSet {
  const empty = new ort.Tensor('float32', new Float32Array(0), [rows, shape.numKvHeads, 0, shape.headDim]);
  return Array.from({ length: 2 * shape.numLayers }, () => empty);
}

function outputsOf(out: StepOutput, n: number): KvSet {
  return Array.from({ length: n }, (_, i) => out[`y.${i}`]);
}

/** Pad's pads for a BNSH tensor: `extra` positions at the end of the length axis. */
function padsTensor(extra: number): ort.Tensor {
  return new ort.Tensor('int64', BigInt64Array.of(0n, 0n, 0n, 0n, 0n, 0n, BigInt(extra), 0n), [8]);
}
