import type { SerializedError } from '../errors.ts';
import type { GenerationRequest, GenerationResult, TokenEvent } from './generation.ts';
import type { SchedulerLimits, SchedulerStats } from './scheduler.ts';
import type { KvBudget } from './step-plan.ts';
import type { Device } from '../runtime/session.ts';
import type { WeightFormat } from '../quant/formats.ts';
import type { WeightsReport } from '../quant/load.ts';

/** Messages between the main thread (EngineClient) and the engine's worker thread. */
export interface WorkerInit {
  modelDir: string;
  cacheDir: string;
  limits: SchedulerLimits;
  threads?: number;
  device?: Device;
  /** Bytes the KV cache may hold at a step's peak, in host memory (--kv-budget) and on the device (--device-kv-budget). */
  kvBudget?: number;
  deviceKvBudget?: number;
  /** Bytes the prefix cache's blocks may hold (0: off). */
  prefixCacheBytes?: number;
  /** The weights' format (default f32); q8/q4 are quantized at load, cached under cacheDir. */
  weights?: WeightFormat;
}

export type ToWorker =
  | { type: 'generate'; key: string; request: GenerationRequest }
  | { type: 'cancel'; key: string }
  | { type: 'stats'; id: number }
  | { type: 'shutdown' };

export type FromWorker =
  | { type: 'ready'; weights: WeightsReport; kvBudget: KvBudget; prefixCacheBytes: number; log: string[] }
  | { type: 'fatal'; error: SerializedError }
  | { type: 'token'; key: string; event: TokenEvent }
  | { type: 'done'; key: string; result: GenerationResult }
  | { type: 'error'; key: string; error: SerializedError }
  | { type: 'stats'; id: number; stats: EngineStats };

export interface EngineStats extends SchedulerStats {
  kvBytes: number;
  /** What the weights are held as (f32, q8, q4) and their bytes. */
  weightsFormat: string;
  weightBytes: number;
}
