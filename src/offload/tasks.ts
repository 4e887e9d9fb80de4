import { ReftError, trainingCharsTooMany, type SerializedError } from '../errors.ts';
import { importPyreft, type PyreftBaseModel, type PyreftImportInput, type PyreftImportResult } from '../interventions/pyreft/index.ts';
import { parseInlineRows, parseJsonl, tokenizeTrainingRows, type ParsedRows } from '../jobs/data.ts';
import { loadModelConfig } from '../model/load.ts';
import { loadTokenizer, type TextTokenizer } from '../model/tokenizer.ts';
import { tokenize, type PromptInput } from '../server/protocol.ts';
import { trainingChars } from './budgets.ts';
import { parseArtifact, type BaseModelShape } from '../interventions/artifact.ts';

/**
 * The work the server moves off its event loop (see pool.ts): tokenizing prompts, checking
 * training data, parsing pyreft pickles and JSONL. Runs in a worker thread; errors come back as
 * serialized ReftErrors.
 */
export type Task =
  | { kind: 'tokenize'; modelDir: string; input: PromptInput }
  | {
      kind: 'training-data';
      modelDir: string;
      data: { jsonl: Uint8Array; field: string } | { rows: unknown[] };
      maxChars: number;
      maxRows: number;
    }
  | { kind: 'jsonl-rows'; bytes: Uint8Array; field: string; maxRows: number }
  | { kind: 'pyreft'; input: PyreftImportInput; base: PyreftBaseModel }
  | { kind: 'artifact'; config: Uint8Array; weights: Uint8Array; base: BaseModelShape };

export type TaskResult = { ok: true; value: unknown } | { ok: false; error: SerializedError };

const tokenizers = new Map<string, Promise<{ tokenizer: TextTokenizer; maxPositions: number }>>();

function model(dir: string) {
  let m = tokenizers.get(dir);
  if (!m) {
    m = loadModelConfig(dir).then(async (config) => ({ tokenizer: await loadTokenizer(dir, config), maxPositions: config.maxPositions }));
    tokenizers.set(dir, m);
  }
  return m;
}

export async function runTask(task: Task): Promise<TaskResult> {
  try {
    return { ok: true, value: await run(task) };
  } catch (e) {
    return { ok: false, error: ReftError.from(e, 'internal error: ').toJSON() };
  }
}

async function run(task: Task): Promise<unknown> {
  switch (task.kind) {
    case 'tokenize':
      return tokenize(task.input, (await model(task.modelDir)).tokenizer);
    case 'jsonl-rows':
      return parseJsonl(task.bytes, task.field, task.maxRows).rows.length;
    case 'training-data': {
      const { tokenizer, maxPositions } = await model(task.modelDir);
      const field = 'jsonl' in task.data ? task.data.field : 'data';
      const parsed: ParsedRows =
        'jsonl' in task.data ? parseJsonl(task.data.jsonl, task.data.field, task.maxRows) : parseInlineRows(task.data.rows);
      const chars = trainingChars(parsed.rows);
      if (chars > task.maxChars) throw trainingCharsTooMany({ field, chars, limit: task.maxChars }, field);
      const examples = tokenizeTrainingRows(parsed, tokenizer, maxPositions, field);
      return { rows: examples.length, longestTokens: examples.reduce((n, e) => Math.max(n, e.tokens.length), 0) };
    }
    case 'artifact':
      return parseArtifact(task.config, task.weights, task.base).config;
    case 'pyreft':
      return (await importPyreft(task.input, task.base)) satisfies PyreftImportResult;
  }
}
