import { join } from 'node:path';
import { Piscina } from 'piscina';
import { ReftError } from '../errors.ts';
import type { PyreftBaseModel, PyreftImportInput, PyreftImportResult } from '../interventions/pyreft/index.ts';
import type { PromptInput } from '../server/protocol.ts';
import type { Task, TaskResult } from './tasks.ts';
import type { BaseModelShape, ReftConfig } from '../interventions/artifact.ts';
import type { QuantizedMatrix } from '../quant/blocks.ts';

/**
 * A small pool of worker threads for the server's CPU-heavy parsing (large JSON bodies,
 * tokenization, training data, pyreft pickles), so none of it stalls the event loop: /healthz and every other tenant keep
 * being answered while it runs. Inputs are bounded before they are sent here.
 */
export class OffloadPool {
  private readonly pool: Piscina;

  constructor(threads = 2) {
    this.pool = new Piscina({ filename: join(import.meta.dirname, 'entry.mjs'), minThreads: 1, maxThreads: threads, idleTimeout: 60_000 });
  }

  private async run<T>(task: Task, transferList: ArrayBuffer[] = []): Promise<T> {
    const r = (await this.pool.run(task, { transferList })) as TaskResult;
    if (!r.ok) throw ReftError.fromJSON(r.error);
    return r.value as T;
  }

  /**
   * A JSON request body, decoded and parsed as the server's parser does (src/server/json-body.ts).
   * Bytes that own their whole buffer are moved to the thread rather than copied.
   */
  parseJson(bytes: Uint8Array): Promise<unknown> {
    const owned = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    return this.run({ kind: 'json', bytes }, owned ? [bytes.buffer as ArrayBuffer] : []);
  }

  tokenize(modelDir: string, input: PromptInput): Promise<number[]> {
    return this.run({ kind: 'tokenize', modelDir, input });
  }

  /** Parses and tokenizes a job's rows (as the worker will), so a bad row is refused at creation. Returns the row count and the longest row's tokens. */
  checkTrainingData(
    modelDir: string,
    data: { jsonl: Uint8Array; field: string } | { rows: unknown[] },
    budget: { maxChars: number; maxRows: number },
  ): Promise<{ rows: number; longestTokens: number }> {
    return this.run({ kind: 'training-data', modelDir, data, ...budget });
  }

  /** Validates an uploaded JSONL file; returns its row count. */
  countJsonlRows(bytes: Uint8Array, field: string, maxRows: number): Promise<number> {
    return this.run({ kind: 'jsonl-rows', bytes, field, maxRows });
  }

  importPyreft(input: PyreftImportInput, base: PyreftBaseModel): Promise<PyreftImportResult> {
    return this.run({ kind: 'pyreft', input, base });
  }

  /** Validates an uploaded artifact completely for the base model (values included); returns its config. */
  checkArtifact(config: Uint8Array, weights: Uint8Array, base: BaseModelShape): Promise<ReftConfig> {
    return this.run({ kind: 'artifact', config, weights, base });
  }

  /** Quantizes the row-major [rows, cols] matrix `w` with the named scheme (src/quant/formats.ts). */
  quantizeRows(scheme: string, w: Float32Array, rows: number, cols: number): Promise<QuantizedMatrix> {
    return this.run({ kind: 'quantize', scheme, w, rows, cols });
  }

  close(): Promise<void> {
    return this.pool.destroy();
  }
}
