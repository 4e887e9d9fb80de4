import type { Checkpoint } from '../model/checkpoint.ts';
import type { WeightsReport } from '../quant/load.ts';
import type { ModelConfig } from '../model/config.ts';
import { DeviceEngine } from './device-engine.ts';
import { Engine, type EngineOptions, type PrefillInput, type PrefillOutput, type SequenceId } from './engine.ts';

/**
 * What the scheduler asks of an engine, step by step (vLLM's split between the scheduler's
 * output and the model runner's execution): the scheduler decides which sequences run and with
 * how many tokens (new prompts together, one chunk of a long prompt, one token for each running
 * sequence, the ones that leave); the executor runs that plan on its KV cache. `Engine` keeps the
 * cache in host memory (the CPU provider reads it in place); `DeviceEngine` keeps it on the GPU
 * and downloads only what the host needs.
 */
export interface StepExecutor {
  readonly config: ModelConfig;
  readonly prefillChunkTokens: number;
  readonly liveSequences: SequenceId[];
  readonly prefilling: SequenceId | null;
  /** Bytes the KV cache holds now. */
  readonly kvBytes: number;
  /** What the weights are held as, and their bytes. */
  readonly weights: WeightsReport;
  prefill(inputs: readonly PrefillInput[]): Promise<PrefillOutput[]>;
  beginPrefill(input: PrefillInput): SequenceId;
  continuePrefill(): Promise<PrefillOutput | null>;
  /** One token for each running sequence; every sequence's next-token logits. */
  decode(tokens: ReadonlyMap<SequenceId, number>): Promise<Map<SequenceId, Float32Array>>;
  /**
   * One token for each running sequence. Sequences in `needLogits` get their logits; the others
   * may get their greedy next token instead (picked where the logits are, on a device).
   */
  decodeStep(tokens: ReadonlyMap<SequenceId, number>, needLogits: ReadonlySet<SequenceId>): Promise<Map<SequenceId, StepSample>>;
  release(id: SequenceId): void;
  /** Whether `rows` sequences of up to `tokens` tokens each fit the KV cache's budget. */
  kvFits(rows: number, tokens: number): boolean;
  close(): Promise<void>;
}

/** A decode step's result for one sequence: its logits, or its greedy token picked on the device. */
export type StepSample = { logits: Float32Array } | { token: number; logprob: number };

export interface ExecutorOptions extends EngineOptions {
  /** Bytes the device KV cache may hold (the WebGPU device; the host cache is bounded by tokens in flight). */
  deviceKvBudget?: number;
}

/** The engine for the options' device: WebGPU keeps the KV cache on the device, the rest on the host. */
export async function createEngine(config: ModelConfig, checkpoint: Checkpoint, opts: ExecutorOptions): Promise<StepExecutor> {
  if (opts.device === 'webgpu') return DeviceEngine.create(config, checkpoint, opts);
  return Engine.create(config, checkpoint, opts);
}
