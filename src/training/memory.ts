import { trainingMemoryExceeded } from '../errors.ts';
import type { ModelConfig } from '../model/config.ts';

/**
 * Training memory is planned, not discovered: the bytes one forward + backward pass of the
 * training graph holds are estimated from the model's shapes and the micro-batch's padded size,
 * and a batch is split into micro-batches (gradient accumulation, token-weighted, so the result
 * is the unsplit batch's) that each stay under the budget.
 *
 * Per token of a micro-batch (rows × padded length), in float32:
 *   layers × (A·hidden + B·intermediate + C·heads·seq)   saved activations and their gradients
 *   + V·vocab                                            logits and their gradient
 * The attention term grows with the padded length (scores and probabilities are [heads, seq, seq]
 * per row).
 *
 * Calibration (stories260k: hidden 64, intermediate 172, 5 layers, 8 heads, vocab 512; CPU; growth
 * of the process's peak RSS over one optimizer step, after the graph is built; LoReFT rank 2 on two
 * layers):
 *   100-token rows:  8 rows +34.7 MiB, 64 rows +246.4 MiB →  3.78 MiB a row →  9,912 floats a token
 *   500-token rows:  8 rows +463.5 MiB, 32 rows +1,856.9 MiB → 58.06 MiB a row → 30,440 floats a token
 * The two lengths give the attention term (≈1.28·heads·seq floats per token and layer) and the rest
 * (≈4,780 floats per token). The constants below round these up: the formula gives 11,304 and 35,304
 * floats a token there (14–16 % over), and 18.9 GB for the 256 rows × 512 tokens (measured
 * 17.3 GB of RSS). The vocabulary share can't be told apart at vocab 512; V = 2 counts the logits and
 * their gradient, which dominate a 49k vocabulary.
 */
const A = 8;
const B = 2;
const C = 1.5;
const V = 2;

/** The default `--train-memory-budget`: 2 GiB of activations per micro-batch. */
export const DEFAULT_TRAIN_MEMORY_BUDGET = 2 * 1024 ** 3;

type Shape = Pick<ModelConfig, 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'vocabSize'>;

/** Estimated bytes of one training pass over `rows` rows padded to `seq` tokens. */
export function stepBytes(config: Shape, rows: number, seq: number): number {
  const perLayer = A * config.hiddenSize + B * config.intermediateSize + C * config.numHeads * seq;
  return 4 * rows * seq * (config.numLayers * perLayer + V * config.vocabSize);
}

/** Rows of `seq` tokens that fit one micro-batch under `budget` bytes (0: not even one). */
export function rowsThatFit(config: Shape, seq: number, budget: number): number {
  return Math.floor(budget / stepBytes(config, 1, seq));
}

/** Refuses a job whose longest row alone exceeds the budget (no split can help it). */
export function checkRowFits(config: Shape, longest: number, budget: number, field = 'data'): void {
  if (rowsThatFit(config, longest, budget) >= 1) return;
  const need = stepBytes(config, 1, longest);
  throw trainingMemoryExceeded({ field, tokens: longest, need: size(need), budget: size(budget) }, field);
}

/**
 * Splits one batch (example indices, with each example's token count) into consecutive
 * micro-batches whose padded size stays under the budget. Order is kept: the split only regroups.
 */
export function planMicroBatches(config: Shape, indices: readonly number[], lengthOf: (i: number) => number, budget: number): number[][] {
  const out: number[][] = [];
  let current: number[] = [];
  let seq = 0;
  for (const i of indices) {
    const s = Math.max(seq, lengthOf(i));
    if (current.length > 0 && stepBytes(config, current.length + 1, s) > budget) {
      out.push(current);
      current = [i];
      seq = lengthOf(i);
    } else {
      current.push(i);
      seq = s;
    }
  }
  if (current.length > 0) out.push(current);
  return out;
}

const size = (bytes: number) => `${Math.ceil(bytes)} bytes (${(bytes / 1024 ** 2).toFixed(1)} MiB)`;
