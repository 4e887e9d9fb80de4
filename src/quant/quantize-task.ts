import { offloadTask } from '../offload/task.ts';
import { quantizeMatrix, type QuantizedMatrix } from './blocks.ts';
import { namedScheme } from './formats.ts';

/**
 * In an offload pool thread: quantizes the row-major [rows, cols] matrix `w` with a scheme named
 * by its id (src/quant/formats.ts), since functions do not cross threads.
 */
export function quantizeRows({ scheme, w, rows, cols }: { scheme: string; w: Float32Array; rows: number; cols: number }): QuantizedMatrix {
  const named = namedScheme(scheme);
  if (!named) throw new Error(`quantizer: no scheme ${scheme}`);
  return quantizeMatrix(w, rows, cols, named);
}

export const QUANTIZE_ROWS = offloadTask(import.meta.url, { quantizeRows });
