import type { AppliedEdit, RequestIntervention } from './generation.ts';
import type { BlockId } from '../prefix-cache/block-index.ts';

/**
 * What the scheduler asks of the runner each step, as a plain value (vLLM v1's split between
 * the scheduler's output and the model runner): the scheduler decides which sequences run with
 * how many tokens, the runner executes that over its KV cache and returns what each sequence
 * needs to pick its next token, and the scheduler updates from the outputs.
 */
export type SequenceId = number;

export interface PrefillInput {
  tokens: readonly number[];
  interventions?: readonly RequestIntervention[];
  /** Return what each intervention did (`applied`, as GenerationResult's). */
  returnCoefficients?: boolean;
  /** Return logits for every prompt position instead of only the last. */
  allLogits?: boolean;
  /**
   * How many leading tokens are the prompt that interventions' positions are counted over
   * (default: all). Recomputing a prompt plus generated tokens keeps the edit on the prompt.
   */
  promptLength?: number;
}

export interface PrefillOutput {
  id: SequenceId;
  /** [vocab] for the last position, or [n, vocab] with `allLogits`. */
  logits: Float32Array;
  /** With `returnCoefficients`: per request item, per intervention, its coefficients. */
  applied?: AppliedEdit[][];
}

/** A decode step's result for one sequence: its logits, or its greedy token picked on the device. */
export type StepSample = { logits: Float32Array } | { token: number; logprob: number };

/** After the prompt's tokens up to its end have run, keep its block `index` (tokens [64·index, 64·index + 64)) as block `id`. */
export interface BlockSave {
  index: number;
  id: BlockId;
}

export interface StepPlan {
  /** Sequences that left since the last step: their KV rows are freed first. */
  release: SequenceId[];
  /** Prefix-cache blocks evicted since the last step: freed first too. */
  dropBlocks: BlockId[];
  /**
   * One token for each sequence of the running batch (every one of them: attention's past is the
   * whole batch); `logits` when its sampler needs them, else a device may pick the greedy token.
   */
  decode: Array<{ seq: SequenceId; token: number; logits: boolean }>;
  /** New prompts prefilled together as the rows of one run (padded to the longest); they then join the batch. */
  prefill: Array<{ seq: SequenceId; input: PrefillInput; save?: BlockSave[] }>;
  /**
   * Prompts prefilled a run each over a cache of their own, tokens [start, end) this step: the
   * one long prompt prefilled a chunk per step, and prompts whose leading blocks are cached
   * (`cached`, loaded on their first run, which starts after them). After its last run a prompt
   * joins the batch.
   */
  chunks: ChunkRun[];
}

export interface ChunkRun {
  seq: SequenceId;
  input: PrefillInput;
  start: number;
  end: number;
  cached?: BlockId[];
  save?: BlockSave[];
}

export interface StepOutputs {
  decoded: Map<SequenceId, StepSample>;
  /** The prompts whose prefill ended this step. */
  prefilled: Map<SequenceId, PrefillOutput>;
  /** Parts of the step that failed; their sequences hold no KV rows any more. */
  failed: Array<{ seqs: SequenceId[]; error: unknown }>;
  /** Prefix-cache blocks saved this step. */
  saved: BlockId[];
}

/** Bytes the KV cache may hold, and where it is (the error for a request that could never fit says which option bounds it). */
export interface KvBudget {
  bytes: number;
  onDevice: boolean;
}

/** What the scheduler needs of a runner. */
export interface StepExecutor {
  readonly config: { readonly maxPositions: number };
  /** Prompts longer than this are prefilled a chunk of this many tokens per step. */
  readonly prefillChunkTokens: number;
  readonly kvBudget: KvBudget;
  /** Bytes `rows` sequences of up to `tokens` tokens each hold at a step's peak. */
  kvStepBytes(rows: number, tokens: number): number;
  /** The prefix cache's budget and a block's bytes, or null when it is off. */
  readonly prefixCache: { budgetBytes: number; blockBytes: number } | null;
  /** A new sequence's id (one counter per runner, whoever starts the sequence). */
  newSequenceId(): SequenceId;
  execute(plan: StepPlan): Promise<StepOutputs>;
}
