import * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../graph/onnx.ts';
import type { KvShape } from './kv-cache.ts';
import { createSession, type SessionOptions } from './session.ts';

/**
 * The KV cache of the running batch, resident on the device.
 *
 * A set holds, per layer, a key and a value tensor [rows, kv_heads, length, head_dim] (BNSH,
 * what GroupQueryAttention reads as past and returns as present); row r is valid up to its own
 * `lengths[r]`, the rest is padding GroupQueryAttention never reads (it overwrites it as the
 * row grows). The decoder's presents replace a set after each step; rows join and leave through
 * two small graphs run on the device (`join`: Pad + Concat, `select`: Gather + Slice), so the
 * past never crosses to the host. Superseded tensors are disposed here: the device frees a
 * buffer only when asked.
 */
export type KvSet = ort.Tensor[]; // keys of layers 0..L-1, then values of layers 0..L-1

export class DeviceKvCache {
  /** The decoding batch's set, or null while it has no rows. */
  private batch: KvSet | null = null;
  /** Cached tokens per batch row. */
  readonly lengths: number[] = [];
  /** Which row of the device set each batch row is, until `settle` rearranges the set. */
  private order: number[] = [];

  private constructor(
    private readonly shape: KvShape,
    private readonly joinSession: ort.InferenceSession,
    private readonly selectSession: ort.InferenceSession,
  ) {}

  static async create(shape: KvShape, opts: SessionOptions): Promise<DeviceKvCache> {
    const n = 2 * shape.numLayers;
    const onDevice = {
      ...opts,
      outputLocations: Object.fromEntries(Array.from({ length: n }, (_, i) => [`y.${i}`, 'gpu-buffer' as const])),
    };
    const [join, select] = await Promise.all([
      createSession(joinGraph(shape, n), '.', onDevice),
      createSession(selectGraph(shape, n), '.', onDevice),
    ]);
    return new DeviceKvCache(shape, join, select);
  }

  get rows(): number {
    return this.lengths.length;
  }

  /** Bytes held by the batch's tensors (padding included). */
  get byteSize(): number {
    return this.batch ? setBytes(this.batch) : 0;
  }

  /** The batch's set (call `settle` first), or an empty one of `rows` rows for a step with no past. */
  past(rows = this.rows): KvSet {
    return this.batch ?? emptySet(this.shape, rows);
  }

  /** The step's presents become the batch's cache; every row grew by `grew` tokens. */
  replace(presents: KvSet, grew: number): void {
    disposeSet(this.batch);
    this.batch = presents;
    for (let r = 0; r < this.rows; r++) this.lengths[r] += grew;
  }

  /** Appends the rows of `set` (lengths `lengths`) after the batch's; takes ownership of `set`. */
  async append(set: KvSet, lengths: readonly number[]): Promise<void> {
    await this.settle();
    if (!this.batch) {
      this.batch = set;
    } else {
      const pad = (t: ort.Tensor, to: number) => padsTensor(to - t.dims[2]);
      const length = Math.max(this.batch[0].dims[2], set[0].dims[2]);
      const feeds: Record<string, ort.Tensor> = { pad_a: pad(this.batch[0], length), pad_b: pad(set[0], length) };
      this.batch.forEach((t, i) => (feeds[`a.${i}`] = t));
      set.forEach((t, i) => (feeds[`b.${i}`] = t));
      const joined = outputsOf(await this.joinSession.run(feeds), set.length);
      disposeSet(this.batch);
      disposeSet(set);
      this.batch = joined;
    }
    for (const n of lengths) {
      this.order.push(this.lengths.length);
      this.lengths.push(n);
    }
  }

  /**
   * Removes row `r` by moving the last row into its place (as the host cache does); returns the
   * index that moved (or -1). The device set is rearranged by the next `settle`, so rows leaving
   * between two steps cost one small graph run together.
   */
  removeRow(r: number): number {
    const last = this.rows - 1;
    if (r !== last) {
      this.lengths[r] = this.lengths[last];
      this.order[r] = this.order[last];
    }
    this.lengths.pop();
    this.order.pop();
    if (this.rows === 0) this.clear();
    return r === last ? -1 : last;
  }

  /** Applies the removals since the last step: picks the rows still live, cut to the longest. */
  async settle(): Promise<void> {
    if (!this.batch || (this.order.length === this.batch[0].dims[0] && this.order.every((p, i) => p === i))) return;
    const length = Math.max(...this.lengths);
    const feeds: Record<string, ort.Tensor> = {
      rows: new ort.Tensor('int64', BigInt64Array.from(this.order, BigInt), [this.order.length]),
      length: new ort.Tensor('int64', BigInt64Array.of(BigInt(length)), [1]),
    };
    this.batch.forEach((t, i) => (feeds[`x.${i}`] = t));
    const selected = outputsOf(await this.selectSession.run(feeds), this.batch.length);
    disposeSet(this.batch);
    this.batch = selected;
    this.order = this.lengths.map((_, i) => i);
  }

  clear(): void {
    disposeSet(this.batch);
    this.batch = null;
    this.lengths.length = 0;
    this.order = [];
  }

  async close(): Promise<void> {
    this.clear();
    await Promise.all([this.joinSession.release(), this.selectSession.release()]);
  }
}

export function disposeSet(set: KvSet | null | undefined): void {
  for (const t of set ?? []) if (t.location === 'gpu-buffer') t.dispose();
}

export function setBytes(set: KvSet): number {
  return set.reduce((n, t) => n + t.dims.reduce((a, b) => a * b, 1) * 4, 0);
}

export function emptySet(shape: KvShape, rows: number): KvSet {
  const empty = new ort.Tensor('float32', new Float32Array(0), [rows, shape.numKvHeads, 0, shape.headDim]);
  return Array.from({ length: 2 * shape.numLayers }, () => empty);
}

function outputsOf(out: ort.InferenceSession.OnnxValueMapType, n: number): KvSet {
  return Array.from({ length: n }, (_, i) => out[`y.${i}`]);
}

/** Pad's pads for a BNSH tensor: `extra` positions at the end of the length axis. */
function padsTensor(extra: number): ort.Tensor {
  return new ort.Tensor('int64', BigInt64Array.of(0n, 0n, 0n, 0n, 0n, 0n, BigInt(extra), 0n), [8]);
}

/** y.i = Concat(Pad(a.i, pad_a), Pad(b.i, pad_b)) along rows: two sets' rows, one length. */
export function joinGraph(shape: KvShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_join');
  const dims = (rows: string, length: string) => [rows, shape.numKvHeads, length, shape.headDim];
  const padA = g.input('pad_a', 'int64', [8]);
  const padB = g.input('pad_b', 'int64', [8]);
  for (let i = 0; i < n; i++) {
    const a = g.op('Pad', [g.input(`a.${i}`, 'float32', dims('rows_a', 'length_a')), padA]);
    const b = g.op('Pad', [g.input(`b.${i}`, 'float32', dims('rows_b', 'length_b')), padB]);
    const y = g.op('Concat', [a, b], { axis: 0 }, { name: `y.${i}` });
    g.output(y, y, 'float32', dims('rows', 'length'));
  }
  return g.encode({ '': 21 });
}

/** y.i = x.i[rows, :, :length]: picks, orders and trims rows. */
export function selectGraph(shape: KvShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_select');
  const dims = (rows: string, length: string) => [rows, shape.numKvHeads, length, shape.headDim];
  const rows = g.input('rows', 'int64', ['kept']);
  const length = g.input('length', 'int64', [1]);
  const zero = g.int64s('zero', [0]);
  const axis = g.int64s('length_axis', [2]);
  for (let i = 0; i < n; i++) {
    const picked = g.op('Gather', [g.input(`x.${i}`, 'float32', dims('rows', 'length_in')), rows], { axis: 0 });
    const y = g.op('Slice', [picked, zero, length, axis], {}, { name: `y.${i}` });
    g.output(y, y, 'float32', dims('kept', 'length'));
  }
  return g.encode({ '': 21 });
}
