import { availableParallelism } from 'node:os';
import { OffloadPool } from '../offload/pool.ts';
import { quantizeMatrix, type QuantizedMatrix, type QuantScheme } from './blocks.ts';
import { namedScheme } from './formats.ts';
import { QUANTIZE_ROWS } from './quantize-task.ts';

/**
 * Quantizes matrices over worker threads (the offload pool's): each matrix is cut into runs of
 * whole rows, quantized in parallel and joined, which gives the same bytes as quantizing it in
 * one piece (blocks, scales and packed zero points are all per row).
 */
export interface MatrixQuantizer {
  quantize(w: Float32Array, rows: number, cols: number, scheme: QuantScheme): Promise<QuantizedMatrix>;
  close(): Promise<void>;
}

/** Below this many weights to quantize in all, starting the threads costs more than they save. */
export const PARALLEL_MIN_WEIGHTS = 4_000_000;
/** Weights per task: enough to outweigh a message, few enough to balance the threads. */
const TASK_WEIGHTS = 1 << 18;

/** The thread count for quantizing `weights` weights: every core for a large model, none (this thread) for a small one. */
export function quantizeThreads(weights: number): number {
  return weights >= PARALLEL_MIN_WEIGHTS ? availableParallelism() : 0;
}

/** With `threads` 0, quantizes on this thread; otherwise over a pool of that many, started on first use. */
export function matrixQuantizer(threads: number): MatrixQuantizer {
  let pool: OffloadPool | null = null;
  return {
    async quantize(w, rows, cols, scheme) {
      // a scheme travels by id, so only the named ones (src/quant/formats.ts) go to the threads
      if (threads < 1 || namedScheme(scheme.id) !== scheme) return quantizeMatrix(w, rows, cols, scheme);
      pool ??= new OffloadPool(threads);
      const step = Math.max(1, Math.min(Math.ceil(rows / (4 * threads)), Math.ceil(TASK_WEIGHTS / cols)));
      const parts: Promise<QuantizedMatrix>[] = [];
      for (let r = 0; r < rows; r += step) {
        const n = Math.min(step, rows - r);
        parts.push(pool.run(QUANTIZE_ROWS, { scheme: scheme.id, w: w.slice(r * cols, (r + n) * cols), rows: n, cols }));
      }
      return joinRows(await Promise.all(parts), rows, cols);
    },
    close: async () => {
      await pool?.close();
    },
  };
}

function joinRows(parts: QuantizedMatrix[], rows: number, cols: number): QuantizedMatrix {
  const join = <T extends Uint8Array | Float32Array>(pick: (p: QuantizedMatrix) => T, make: (n: number) => T): T => {
    const out = make(parts.reduce((n, p) => n + pick(p).length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(pick(p), at);
      at += pick(p).length;
    }
    return out;
  };
  const { bits, blockSize, blocks } = parts[0];
  return {
    rows,
    cols,
    bits,
    blockSize,
    blocks,
    data: join(
      (p) => p.data,
      (n) => new Uint8Array(n),
    ),
    scales: join(
      (p) => p.scales,
      (n) => new Float32Array(n),
    ),
    zeros: parts[0].zeros
      ? join(
          (p) => p.zeros!,
          (n) => new Uint8Array(n),
        )
      : null,
  };
}
