import { defineError } from './reft-error.ts';

/** Training: jobs, their data (inline rows or JSONL files), recipes, budgets and checkpoints. */

// jobs
export const jobNotFound = defineError('job_not_found', 'not_found', (p: { id: string }) => `no training job "${p.id}"`);
export const jobDataSourceAmbiguous = defineError(
  'job_data_source_ambiguous',
  'invalid_request',
  () => 'give exactly one of training_file and data',
);
export const jobAlreadyFinished = defineError(
  'job_already_finished',
  'conflict',
  (p: { id: string; status: string }) => `training job "${p.id}" has already ${p.status === 'cancelled' ? 'been cancelled' : p.status}`,
);
export const jobTimeBudgetExceeded = defineError(
  'job_time_budget_exceeded',
  'invalid_request',
  (p: { seconds: number; step: number }) => `the job exceeded its time budget of ${p.seconds} s at step ${p.step}`,
);
export const jobStepBudgetExceeded = defineError(
  'job_step_budget_exceeded',
  'invalid_request',
  (p: { steps: number; limit: number }) => `the job needs ${p.steps} steps, over the budget of ${p.limit}`,
);
export const trainingMemoryExceeded = defineError(
  'training_memory_exceeded',
  'payload_too_large',
  (p: { field: string; tokens: number; need: string; budget: string }) =>
    `${p.field}: a row of ${p.tokens} tokens needs about ${p.need} to train, over the training memory budget (--train-memory-budget) of ${p.budget}`,
);

// training files and rows
export const fileNotFound = defineError('file_not_found', 'not_found', (p: { id: string }) => `no file "${p.id}"`);
export const filePartCount = defineError('file_part_count', 'invalid_request', (p: { given: number }) =>
  p.given ? 'give one file part' : 'missing part "file"',
);
export const filePurposeInvalid = defineError('file_purpose_invalid', 'invalid_request', () => 'purpose must be "fine-tune"');
export const trainingFileNotUtf8 = defineError(
  'training_file_not_utf8',
  'invalid_request',
  (p: { field: string }) => `${p.field}: the file is not UTF-8 text`,
);
export const trainingLineNotJson = defineError(
  'training_line_not_json',
  'invalid_request',
  (p: { field: string; line: number }) => `${p.field}: line ${p.line} is not valid JSON`,
);
/** A row that isn't {prompt, completion} or {messages}, or whose parts are empty or don't fit. */
export const trainingRowInvalid = defineError(
  'training_row_invalid',
  'invalid_request',
  (p: { at: string; problem: string }) => `${p.at}: ${p.problem}`,
);
export const trainingRowsTooMany = defineError(
  'training_rows_too_many',
  'payload_too_large',
  (p: { field: string; limit: number }) => `${p.field}: more than ${p.limit} rows (the training rows limit)`,
);
export const trainingCharsTooMany = defineError(
  'training_chars_too_many',
  'payload_too_large',
  (p: { field: string; chars: number; limit: number }) =>
    `${p.field}: the rows hold ${p.chars} characters, over the training data limit of ${p.limit}`,
);
export const trainingDataEmpty = defineError('training_data_empty', 'invalid_request', (p: { what: string }) => `${p.what} has no rows`);
export const trainingPromptTooLong = defineError(
  'training_prompt_too_long',
  'invalid_request',
  (p: { at: string; tokens: number; context: number }) => `${p.at}: the prompt has ${p.tokens} tokens; the model's context is ${p.context}`,
);

// recipes
export const recipeInvalid = defineError(
  'recipe_invalid',
  'invalid_request',
  (p: { field: string; problem: string }) => `${p.field}: ${p.problem}`,
);
export const recipeLayerOutOfRange = defineError(
  'recipe_layer_out_of_range',
  'invalid_request',
  (p: { layer: number; layers: number }) => `recipe.layers: layer ${p.layer} is out of range (the model has ${p.layers} layers)`,
);
export const recipeRankTooLarge = defineError(
  'recipe_rank_too_large',
  'invalid_request',
  (p: { rank: number; hiddenSize: number }) => `recipe.rank ${p.rank} exceeds the hidden size ${p.hiddenSize}`,
);

// checkpoints (a job resumes from its own)
export const checkpointInvalid = defineError('checkpoint_invalid', 'invalid_request', (p: { problem: string }) => p.problem);
export const checkpointMismatch = defineError(
  'checkpoint_mismatch',
  'invalid_request',
  (p: { problem: string }) => `the checkpoint ${p.problem}`,
);
