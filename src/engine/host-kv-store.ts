import * as ort from 'onnxruntime-node';
import { decoderInputs as IN, decoderOutputs as OUT, type AttentionLayout } from '../graph/decoder.ts';
import { ropeTables, rotateHeads, type RopeTables } from '../graph/rope.ts';
import type { ModelConfig } from '../model/config.ts';
import { kvBytesPerToken, type KvBlock, type KvPlacement, type KvStore, type StepOutput } from './kv-store.ts';

/**
 * The KV cache in host memory, which the CPU provider reads in place.
 *
 * Per layer, keys and values live in one slab laid out [rows, kv_heads, capacity, head_dim]
 * (BNSH, what GroupQueryAttention reads as `past_key`), so a step's past over every row is a
 * zero-copy view. The host graph returns only the new keys and values (or the packed q/k/v
 * projection, whose keys come back unrotated and are rotated here); `keep` appends them.
 * The slabs are sized to what the rows hold (see `fit`), so memory follows the rows that are
 * live, which is what the KV budget counts.
 */
const TOKEN_BLOCK = 64;
const ROW_BLOCK = 4;
/**
 * A slab allocated for `capacity` tokens a row has room for this much more, so that decoding
 * grows it in place for a while: re-laying out a slab moves each row's heads apart, and within
 * memory already written that costs a copy, while fresh memory costs its first write too (page
 * faults: on this 2-core VM, 184 MB, the cache of 4,000 tokens of the 135M model, took 100-500 ms
 * to copy into fresh memory and 10-15 ms to move within a slab, once per 64 tokens decoded).
 */
const ROOM = 1 / 4;

const roundUp = (n: number, block: number) => Math.ceil(n / block) * block;

/** Where new key or value rows sit in a graph output: token t at data[offset + t·stride]. */
interface RowSource {
  data: Float32Array;
  offset: number;
  stride: number;
}

export class HostKvPlacement implements KvPlacement {
  readonly side = 'host' as const;
  readonly outputLocations = undefined;
  /** The outputs a step must fetch for the store to keep its keys and values. */
  readonly fetches: string[] = [];
  /** Set for the packed layout, whose new keys come back unrotated. */
  private readonly rope: RopeTables | undefined;

  constructor(
    private readonly config: ModelConfig,
    readonly layout: AttentionLayout,
  ) {
    for (let l = 0; l < config.numLayers; l++) {
      if (layout === 'packed') this.fetches.push(OUT.qkv(l));
      else this.fetches.push(OUT.newKey(l), OUT.newValue(l));
    }
    this.rope = layout === 'packed' ? ropeTables(config) : undefined;
  }

  createStore(rows: number, tokens = 0): HostKvStore {
    const store = new HostKvStore(this.config, (out, l) => this.newRows(out, l), this.rope);
    store.addRows(rows, tokens);
    return store;
  }

  async storeFromBlocks(blocks: readonly KvBlock[], tokens: number): Promise<HostKvStore> {
    const store = this.createStore(1, tokens);
    for (const block of blocks) {
      if (!(block instanceof HostKvBlock)) throw new Error('a host KV store loads only host blocks');
      store.importBlock(block);
    }
    return store;
  }

  /** The rows' slabs (padded to the longest row) and attention's present, a copy of them. */
  stepBytes(rows: number, tokens: number): number {
    return 2 * rows * roundUp(tokens, TOKEN_BLOCK) * kvBytesPerToken(this.config);
  }

  async close(): Promise<void> {}

  /** Where layer l's new keys and values sit in a step's outputs. */
  private newRows(out: StepOutput, l: number): { keys: RowSource; values: RowSource } {
    const { numHeads, numKvHeads, headDim } = this.config;
    const kvDim = numKvHeads * headDim;
    if (this.layout === 'packed') {
      const data = out[OUT.qkv(l)].data as Float32Array;
      const stride = (numHeads + 2 * numKvHeads) * headDim;
      return { keys: { data, offset: numHeads * headDim, stride }, values: { data, offset: numHeads * headDim + kvDim, stride } };
    }
    return {
      keys: { data: out[OUT.newKey(l)].data as Float32Array, offset: 0, stride: kvDim },
      values: { data: out[OUT.newValue(l)].data as Float32Array, offset: 0, stride: kvDim },
    };
  }
}

export class HostKvStore implements KvStore {
  private keys: Float32Array[] = [];
  private values: Float32Array[] = [];
  private rowCapacity = 0;
  /** Tokens each row can hold without re-layout (the slabs' S dimension). */
  private capacity = 0;
  /** The capacity the slabs have memory for (ROOM), up to which they grow in place. */
  private room = 0;
  readonly lengths: number[] = [];
  /** The past feeds over every row, rebuilt only when the slabs or the rows change. */
  private past: Record<string, ort.Tensor> | null = null;

  constructor(
    private readonly config: ModelConfig,
    private readonly newRows: (out: StepOutput, layer: number) => { keys: RowSource; values: RowSource },
    private readonly rope: RopeTables | undefined,
  ) {}

  /**
   * The slabs up to their capacity. The room beyond it is address space the kernel maps to
   * memory only when decoding grows the slabs into it (a fresh allocation's pages are its zero
   * page until written), and the budget counts the capacity it grows to.
   */
  get byteSize(): number {
    return this.keys.length * 2 * this.rowCapacity * this.rowStride * Float32Array.BYTES_PER_ELEMENT;
  }

  private get rowStride(): number {
    return this.config.numKvHeads * this.capacity * this.config.headDim;
  }

  /** Adds `rows` empty rows with room for `tokens` tokens each. */
  addRows(rows: number, tokens: number): void {
    this.lengths.push(...new Array<number>(rows).fill(0));
    this.fit(Math.max(tokens, ...this.lengths));
    this.past = null;
  }

  /**
   * Sizes the slabs for the rows and `tokens` tokens each. They grow to whole blocks (4 rows, 64
   * tokens) and shrink once a block or more (rows) or two blocks (tokens) are spare, so rows
   * joining and leaving seldom re-lay them out, and what they hold stays within a few rows and
   * 127 tokens of what the rows need. A store made with its rows (a prompt's) holds exactly those.
   */
  private fit(tokens: number): void {
    const rows = this.lengths.length;
    let { rowCapacity, capacity } = this;
    if (rows === 0 || rows > rowCapacity || rowCapacity - rows >= ROW_BLOCK)
      rowCapacity = this.rowCapacity === 0 ? rows : roundUp(rows, ROW_BLOCK);
    if (tokens > capacity || capacity - tokens >= 2 * TOKEN_BLOCK) capacity = roundUp(tokens, TOKEN_BLOCK);
    if (rowCapacity === this.rowCapacity && capacity === this.capacity) return;
    const { numKvHeads, headDim, numLayers, maxPositions } = this.config;
    /** Copies each row's tokens from `old` laid out at this.capacity to `next` at `capacity` (`next` may be `old`). */
    const move = (old: Float32Array, next: Float32Array) => {
      const blocks = rows * numKvHeads;
      for (let i = 0; i < blocks; i++) {
        // in place the heads move up: the last one first, before an earlier one lands on it
        const b = old === next ? blocks - 1 - i : i;
        const n = this.lengths[Math.floor(b / numKvHeads)] * headDim;
        const from = b * this.capacity * headDim;
        if (old === next) next.copyWithin(b * capacity * headDim, from, from + n);
        else next.set(old.subarray(from, from + n), b * capacity * headDim);
      }
    };
    if (rowCapacity === 0 || capacity === 0) {
      [this.keys, this.values] = [[], []];
      [rowCapacity, capacity, this.room] = [0, 0, 0];
    } else if (rowCapacity === this.rowCapacity && capacity > this.capacity && capacity <= this.room) {
      for (const slab of [...this.keys, ...this.values]) move(slab, slab);
    } else {
      const room = Math.max(capacity, Math.min(roundUp(capacity * (1 + ROOM), TOKEN_BLOCK), roundUp(maxPositions, TOKEN_BLOCK)));
      const relayout = (old: Float32Array | undefined) => {
        const next = new Float32Array(rowCapacity * numKvHeads * room * headDim);
        if (old) move(old, next);
        return next;
      };
      for (let l = 0; l < numLayers; l++) {
        this.keys[l] = relayout(this.keys[l]);
        this.values[l] = relayout(this.values[l]);
      }
      this.room = room;
    }
    this.capacity = capacity;
    this.rowCapacity = rowCapacity;
    this.past = null;
  }

  async feedPast(feeds: Record<string, ort.Tensor>): Promise<void> {
    if (!this.past) {
      const { numLayers, numKvHeads, headDim } = this.config;
      const rows = this.lengths.length;
      const dims = [rows, numKvHeads, this.capacity, headDim];
      const end = rows * this.rowStride;
      const view = (slab: Float32Array | undefined) => new ort.Tensor('float32', slab ? slab.subarray(0, end) : new Float32Array(0), dims);
      this.past = {};
      for (let l = 0; l < numLayers; l++) {
        this.past[IN.pastKey(l)] = view(this.keys[l]);
        this.past[IN.pastValue(l)] = view(this.values[l]);
      }
    }
    Object.assign(feeds, this.past);
  }

  keep(out: StepOutput, seq: number, grew: readonly number[]): void {
    const rows = this.lengths.length;
    let longest = 0;
    for (let r = 0; r < rows; r++) longest = Math.max(longest, this.lengths[r] + grew[r]);
    if (longest > this.capacity) this.fit(longest);
    for (let l = 0; l < this.config.numLayers; l++) {
      const { keys, values } = this.newRows(out, l);
      for (let r = 0; r < rows; r++) this.append(l, r, keys, values, r * seq, grew[r]);
    }
    for (let r = 0; r < rows; r++) this.lengths[r] += grew[r];
  }

  /**
   * Appends `count` tokens, from token `first` of the step's [batch·seq] outputs, to row `row`.
   * Token t's keys start at keys.data[keys.offset + t·keys.stride] (kv_heads·head_dim floats).
   */
  private append(layer: number, row: number, keys: RowSource, values: RowSource, first: number, count: number): void {
    const { numKvHeads, headDim } = this.config;
    const start = this.lengths[row];
    const [k, v] = [this.keys[layer], this.values[layer]];
    for (let s = 0; s < count; s++) {
      const kFrom = keys.offset + (first + s) * keys.stride;
      const vFrom = values.offset + (first + s) * values.stride;
      for (let h = 0; h < numKvHeads; h++) {
        const dst = ((row * numKvHeads + h) * this.capacity + start + s) * headDim;
        if (this.rope) rotateHeads(this.rope, keys.data, kFrom + h * headDim, k, dst, 1, start + s);
        else k.set(keys.data.subarray(kFrom + h * headDim, kFrom + (h + 1) * headDim), dst);
        v.set(values.data.subarray(vFrom + h * headDim, vFrom + (h + 1) * headDim), dst);
      }
    }
  }

  async exportBlock(row: number, start: number, tokens: number): Promise<HostKvBlock> {
    const { numKvHeads, headDim, numLayers } = this.config;
    const copy = (slab: Float32Array) => {
      const out = new Float32Array(numKvHeads * tokens * headDim);
      for (let h = 0; h < numKvHeads; h++) {
        const from = ((row * numKvHeads + h) * this.capacity + start) * headDim;
        out.set(slab.subarray(from, from + tokens * headDim), h * tokens * headDim);
      }
      return out;
    };
    return new HostKvBlock(
      tokens,
      Array.from({ length: numLayers }, (_, l) => copy(this.keys[l])),
      Array.from({ length: numLayers }, (_, l) => copy(this.values[l])),
    );
  }

  /** Appends a block's tokens to the first row (a store made for one prompt). */
  importBlock(block: HostKvBlock): void {
    const { numKvHeads, headDim, numLayers } = this.config;
    const start = this.lengths[0];
    if (start + block.tokens > this.capacity) this.fit(start + block.tokens);
    for (let l = 0; l < numLayers; l++) {
      for (let h = 0; h < numKvHeads; h++) {
        const from = h * block.tokens * headDim;
        const to = (h * this.capacity + start) * headDim;
        this.keys[l].set(block.keys[l].subarray(from, from + block.tokens * headDim), to);
        this.values[l].set(block.values[l].subarray(from, from + block.tokens * headDim), to);
      }
    }
    this.lengths[0] += block.tokens;
  }

  async adopt(other: KvStore): Promise<void> {
    if (!(other instanceof HostKvStore)) throw new Error('a host KV store adopts only host rows');
    const first = this.lengths.length;
    this.addRows(other.lengths.length, Math.max(0, ...other.lengths));
    const { numKvHeads, headDim, numLayers } = this.config;
    for (let i = 0; i < other.lengths.length; i++) {
      const n = other.lengths[i] * headDim;
      for (let l = 0; l < numLayers; l++) {
        for (let h = 0; h < numKvHeads; h++) {
          const from = (i * numKvHeads + h) * other.capacity * headDim;
          const to = ((first + i) * numKvHeads + h) * this.capacity * headDim;
          this.keys[l].set(other.keys[l].subarray(from, from + n), to);
          this.values[l].set(other.values[l].subarray(from, from + n), to);
        }
      }
      this.lengths[first + i] = other.lengths[i];
    }
    other.clear();
  }

  removeRow(r: number): number {
    const last = this.lengths.length - 1;
    if (r !== last) {
      const stride = this.rowStride;
      for (let l = 0; l < this.config.numLayers; l++) {
        this.keys[l].copyWithin(r * stride, last * stride, last * stride + stride);
        this.values[l].copyWithin(r * stride, last * stride, last * stride + stride);
      }
      this.lengths[r] = this.lengths[last];
    }
    this.lengths.pop();
    this.fit(Math.max(0, ...this.lengths));
    this.past = null;
    return r === last ? -1 : last;
  }

  clear(): void {
    this.lengths.length = 0;
    this.fit(0);
  }
}

/** Keys and values of some tokens, per layer [kv_heads, tokens, head_dim]. */
export class HostKvBlock implements KvBlock {
  constructor(
    readonly tokens: number,
    readonly keys: Float32Array[],
    readonly values: Float32Array[],
  ) {}

  dispose(): void {}
}
