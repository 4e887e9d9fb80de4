import { rotateHeads, type RopeTables } from '../graph/rope.ts';

/**
 * The KV cache of the running batch, kept on the JS side.
 *
 * Per layer, keys and values live in one slab laid out [rows, kv_heads, capacity, head_dim]
 * (BNSH, what GroupQueryAttention reads as `past_key`). Row r belongs to the r-th running
 * sequence, so the past of a decode step over all rows is a zero-copy view of the slab's first
 * `rows` rows. Rows are kept dense: removing a sequence moves the last row into its place.
 * Capacity grows in blocks; growing re-lays out the slab, which happens once per block of tokens.
 */
/** Where new key or value rows sit in a graph output: token t at data[offset + t·stride]. */
export interface RowSource {
  data: Float32Array;
  offset: number;
  stride: number;
}

export interface KvShape {
  numLayers: number;
  numKvHeads: number;
  headDim: number;
}

const CAPACITY_BLOCK = 64;

export class KvCache {
  private keys: Float32Array[] = [];
  private values: Float32Array[] = [];
  private rowCapacity = 0;
  /** Tokens each row can hold without re-layout (the slab's S dimension). */
  capacity = 0;
  /** Cached tokens per row. */
  readonly lengths: number[] = [];
  /** Changes whenever `past` views change (rows added or removed, slabs re-laid out). */
  layoutVersion = 0;

  constructor(private readonly shape: KvShape) {}

  get rows(): number {
    return this.lengths.length;
  }

  /** Bytes held by the slabs. */
  get byteSize(): number {
    return this.keys.reduce((s, k) => s + k.byteLength * 2, 0);
  }

  private rowStride(capacity = this.capacity): number {
    return this.shape.numKvHeads * capacity * this.shape.headDim;
  }

  /** Makes room for `rows` rows of `tokens` tokens each, re-laying out the slabs if needed. */
  reserve(rows: number, tokens: number): void {
    const capacity = tokens > this.capacity ? Math.ceil(tokens / CAPACITY_BLOCK) * CAPACITY_BLOCK : this.capacity;
    const rowCapacity = rows > this.rowCapacity ? Math.max(rows, Math.ceil(this.rowCapacity * 1.5), 4) : this.rowCapacity;
    if (capacity === this.capacity && rowCapacity === this.rowCapacity) return;
    const relayout = (old: Float32Array | undefined) => {
      const next = new Float32Array(rowCapacity * this.rowStride(capacity));
      if (old) this.copyRows(old, this.capacity, next, capacity);
      return next;
    };
    for (let l = 0; l < this.shape.numLayers; l++) {
      this.keys[l] = relayout(this.keys[l]);
      this.values[l] = relayout(this.values[l]);
    }
    this.capacity = capacity;
    this.rowCapacity = rowCapacity;
    this.layoutVersion++;
  }

  private copyRows(src: Float32Array, srcCap: number, dst: Float32Array, dstCap: number): void {
    const { numKvHeads, headDim } = this.shape;
    for (let r = 0; r < this.rows; r++) {
      const n = this.lengths[r] * headDim;
      for (let h = 0; h < numKvHeads; h++) {
        const from = (r * numKvHeads + h) * srcCap * headDim;
        const to = (r * numKvHeads + h) * dstCap * headDim;
        dst.set(src.subarray(from, from + n), to);
      }
    }
  }

  /** Adds an empty row and returns its index. */
  addRow(): number {
    this.reserve(this.rows + 1, Math.max(this.capacity, 1));
    this.lengths.push(0);
    this.layoutVersion++;
    return this.rows - 1;
  }

  /** Removes row `r` by moving the last row into it; returns the index that moved (or -1). */
  removeRow(r: number): number {
    const last = this.rows - 1;
    if (r !== last) {
      const stride = this.rowStride();
      for (let l = 0; l < this.shape.numLayers; l++) {
        this.keys[l].copyWithin(r * stride, last * stride, last * stride + stride);
        this.values[l].copyWithin(r * stride, last * stride, last * stride + stride);
      }
      this.lengths[r] = this.lengths[last];
    }
    this.lengths.pop();
    this.layoutVersion++;
    return r === last ? -1 : last;
  }

  /**
   * Appends `count` new tokens of batch row `batchRow` to cache row `row`. Token t's keys start at
   * keys.data[keys.offset + t·keys.stride] (kv_heads·head_dim floats), likewise values; t counts
   * over the graph output's [batch, seq] tokens. `rope`, when given, rotates the keys at their
   * positions on the way in (the packed layout returns them unrotated).
   */
  append(
    layer: number,
    row: number,
    keys: RowSource,
    values: RowSource,
    batchRow: number,
    seq: number,
    count: number,
    rope?: RopeTables,
  ): void {
    const { numKvHeads, headDim } = this.shape;
    const start = this.lengths[row];
    if (start + count > this.capacity) throw new Error(`KV cache row ${row} overflow: reserve before appending`);
    const k = this.keys[layer];
    const v = this.values[layer];
    for (let s = 0; s < count; s++) {
      const token = batchRow * seq + s;
      const kFrom = keys.offset + token * keys.stride;
      const vFrom = values.offset + token * values.stride;
      for (let h = 0; h < numKvHeads; h++) {
        const dst = ((row * numKvHeads + h) * this.capacity + start + s) * headDim;
        if (rope) rotateHeads(rope, keys.data, kFrom + h * headDim, k, dst, 1, start + s);
        else k.set(keys.data.subarray(kFrom + h * headDim, kFrom + (h + 1) * headDim), dst);
        v.set(values.data.subarray(vFrom + h * headDim, vFrom + (h + 1) * headDim), dst);
      }
    }
  }

  /** Call once per step after every layer's `append`. */
  advance(row: number, count: number): void {
    this.lengths[row] += count;
  }

  /**
   * Past tensors' data for `rows` rows from row `from` (default: all of them):
   * [rows, kv_heads, capacity, head_dim] views.
   */
  past(layer: number, rows = this.rows, from = 0): { key: Float32Array; value: Float32Array; dims: [number, number, number, number] } {
    const stride = this.rowStride();
    const [start, end] = [from * stride, (from + rows) * stride];
    return {
      key: this.keys[layer].subarray(start, end),
      value: this.values[layer].subarray(start, end),
      dims: [rows, this.shape.numKvHeads, this.capacity, this.shape.headDim],
    };
  }

  /** Exchanges rows `a` and `b` (their tokens and lengths). */
  swapRows(a: number, b: number): void {
    const stride = this.rowStride();
    for (const slabs of [this.keys, this.values]) {
      for (const slab of slabs) {
        const rowA = slab.slice(a * stride, (a + 1) * stride);
        slab.copyWithin(a * stride, b * stride, (b + 1) * stride);
        slab.set(rowA, b * stride);
      }
    }
    [this.lengths[a], this.lengths[b]] = [this.lengths[b], this.lengths[a]];
    this.layoutVersion++;
  }

  clear(): void {
    this.lengths.length = 0;
    this.keys = [];
    this.values = [];
    this.rowCapacity = 0;
    this.capacity = 0;
    this.layoutVersion++;
  }
}
