import type { AppliedEdit, RequestIntervention } from './generation.ts';

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

export interface StepPlan {
  /** Sequences that left since the last step: their KV rows are freed first. */
  release: SequenceId[];
  /**
   * One token for each sequence of the running batch (every one of them: attention's past is the
   * whole batch); `logits` when its sampler needs them, else a device may pick the greedy token.
   */
  decode: Array<{ seq: SequenceId; token: number; logits: boolean }>;
  /** New prompts prefilled together as the rows of one run (padded to the longest); they then join the batch. */
  prefill: Array<{ seq: SequenceId; input: PrefillInput }>;
  /**
   * Tokens [start, end) of the one long prompt being prefilled a chunk per step over its own
   * cache (the first chunk starts it); after its last chunk it joins the batch.
   */
  chunk: { seq: SequenceId; input: PrefillInput; start: number; end: number } | null;
}

export interface StepOutputs {
  decoded: Map<SequenceId, StepSample>;
  /** The prompts prefilled this step, and the long prompt once its last chunk has run. */
  prefilled: Map<SequenceId, PrefillOutput>;
  /** Parts of the step that failed; their sequences hold no KV rows any more. */
  failed: Array<{ seqs: SequenceId[]; error: unknown }>;
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
  /** A new sequence's id (one counter per runner, whoever starts the sequence). */
  newSequenceId(): SequenceId;
  execute(plan: StepPlan): Promise<StepOutputs>;
}
