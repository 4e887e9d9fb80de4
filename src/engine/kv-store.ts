import type * as ort from 'onnxruntime-node';
import type { KvCacheSide } from '../graph/decoder.ts';

/** A decoder run's outputs, by name. */
export type StepOutput = ort.InferenceSession.OnnxValueMapType;

/**
 * The KV cache of some rows, wherever it lives. The step runner keeps one store for the decoding
 * batch, one for the long prompt being prefilled a chunk at a time, and a fresh one for the
 * prompts a step prefills together, which then joins the batch. Rows are dense: a row that
 * leaves is replaced by the last one, as the runner's row bookkeeping mirrors.
 *
 * Two implementations: `HostKvStore` (slabs in host memory that the CPU provider reads in
 * place; the graph returns only the new keys and values) and `DeviceKvStore` (tensors on the
 * device; the graph's presents replace them each step).
 */
export interface KvStore {
  /** Cached tokens per row. */
  readonly lengths: readonly number[];
  /** Bytes held now, padding included. */
  readonly byteSize: number;
  /** Sets a step's past inputs: every row of this store, as the step's rows in order. */
  feedPast(feeds: Record<string, ort.Tensor>): Promise<void>;
  /**
   * Keeps a step's new keys and values: the step ran `seq` tokens per row (padded), and row r of
   * this store grew by `grew[r]` of them.
   */
  keep(out: StepOutput, seq: number, grew: readonly number[]): void;
  /** Moves every row of `other` (of the same kind) after this store's rows; `other` is left empty. */
  adopt(other: KvStore): Promise<void>;
  /** A copy of row `row`'s tokens [start, start + tokens), to keep in the prefix cache. */
  exportBlock(row: number, start: number, tokens: number): Promise<KvBlock>;
  /** Removes row `r` by moving the last row into its place; returns the index that moved, or -1. */
  removeRow(r: number): number;
  /** Frees everything the store holds; it has no rows after. */
  clear(): void;
}

/** Where a runner keeps its KV cache: the graph variant that goes with it and how to make stores. */
export interface KvPlacement {
  /** Which variant of the decoder graph returns this placement's keys and values. */
  readonly side: KvCacheSide;
  /** The decoder session's outputs to leave on the device, if any. */
  readonly outputLocations: Record<string, 'gpu-buffer'> | undefined;
  /** The outputs a step fetches for the store to keep its keys and values; null: every output (the device variant's). */
  readonly fetches: readonly string[] | null;
  /** A store of `rows` empty rows. */
  createStore(rows: number): KvStore;
  /** A store of one row holding `blocks`' tokens in order (a prompt's cached prefix), with room for `tokens` tokens. */
  storeFromBlocks(blocks: readonly KvBlock[], tokens: number): Promise<KvStore>;
  /**
   * The bytes `rows` rows of up to `tokens` tokens hold at a step's peak: a step holds its past
   * and what attention writes (a present of past + new, or the host's copy) at once, each padded
   * to the longest row.
   */
  stepBytes(rows: number, tokens: number): number;
  close(): Promise<void>;
}

/** Some tokens' keys and values kept apart from any row (a prefix-cache block), where the placement keeps its cache. */
export interface KvBlock {
  readonly tokens: number;
  dispose(): void;
}

/** Bytes of keys and values one token takes over every layer (float32). */
export function kvBytesPerToken(shape: KvShape): number {
  return 2 * shape.numLayers * shape.numKvHeads * shape.headDim * 4;
}

export interface KvShape {
  numLayers: number;
  numKvHeads: number;
  headDim: number;
}
