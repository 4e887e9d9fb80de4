import { expectedTensors, type Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import type { QuantScheme } from './blocks.ts';
import { quantizedCheckpoint, type QuantCacheOutcome, type QuantizedCheckpoint } from './cache.ts';
import { QUANT_SCHEMES, type WeightFormat } from './formats.ts';

/** A named format, or a scheme of its own (tests compare reference quantizers through it). */
export type WeightsChoice = WeightFormat | QuantScheme;

/** What the engine's weights are held as: reported by `model ready`, /v1/models and /metrics. */
export interface WeightsReport {
  /** f32, q8, q4, or a custom scheme's id. */
  format: string;
  /** Bytes of weights the graph holds (quantized blocks, scales and float tensors). */
  bytes: number;
  /** Quantized formats: whether the quantization cache was hit, built or rebuilt. */
  cache: QuantCacheOutcome | null;
}

export async function loadWeights(
  config: ModelConfig,
  checkpoint: Checkpoint,
  choice: WeightsChoice,
  cacheDir: string,
  log?: (message: string) => void,
): Promise<{ quantized: QuantizedCheckpoint | null; report: WeightsReport }> {
  if (choice === 'f32') {
    const bytes = expectedTensors(config).reduce((a, t) => a + 4 * t.shape.reduce((x, y) => x * y, 1), 0);
    return { quantized: null, report: { format: 'f32', bytes, cache: null } };
  }
  const scheme = typeof choice === 'string' ? QUANT_SCHEMES[choice] : choice;
  const quantized = await quantizedCheckpoint(config, checkpoint, scheme, cacheDir, { log });
  const format = typeof choice === 'string' ? choice : scheme.id;
  return { quantized, report: { format, bytes: quantized.bytes, cache: quantized.outcome } };
}
