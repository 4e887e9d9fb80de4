import { ReftError, trainingCharsTooMany, type SerializedError } from '../errors.ts';
import type { PyreftBaseModel, PyreftImportInput, PyreftImportResult } from '../interventions/pyreft/index.ts';
import type { ParsedRows } from '../jobs/data.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import type { PromptInput } from '../server/protocol.ts';
import { trainingChars } from './budgets.ts';
import type { BaseModelShape } from '../interventions/artifact.ts';

/**
 * The work the server moves off its event loop (see pool.ts): parsing large JSON bodies, tokenizing prompts, checking
 * training data, parsing pyreft pickles and JSONL; and the rows of a matrix to quantize, when
 * a checkpoint is quantized over several threads (src/quant/parallel.ts). Runs in a worker thread; errors come back as
 * serialized ReftErrors. Each kind imports its modules when first run, so a thread started to
 * quantize loads none of the tokenizer's, training data's and pickle parser's.
 */
export type Task =
  | { kind: 'json'; bytes: Uint8Array }
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
  | { kind: 'artifact'; config: Uint8Array; weights: Uint8Array; base: BaseModelShape }
  | { kind: 'quantize'; scheme: string; w: Float32Array; rows: number; cols: number };

export type TaskResult = { ok: true; value: unknown } | { ok: false; error: SerializedError };

const tokenizers = new Map<string, Promise<{ tokenizer: TextTokenizer; maxPositions: number }>>();

function model(dir: string) {
  let m = tokenizers.get(dir);
  if (!m) {
    m = (async () => {
      const [{ loadModelConfig }, { loadTokenizer }] = await Promise.all([import('../model/load.ts'), import('../model/tokenizer.ts')]);
      const config = await loadModelConfig(dir);
      return { tokenizer: await loadTokenizer(dir, config), maxPositions: config.maxPositions };
    })();
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
    case 'json': {
      const { parseJsonBody } = await import('../server/json-body.ts');
      return parseJsonBody(Buffer.from(task.bytes.buffer, task.bytes.byteOffset, task.bytes.byteLength).toString('utf8'));
    }
    case 'tokenize': {
      const { tokenize } = await import('../server/protocol.ts');
      return tokenize(task.input, (await model(task.modelDir)).tokenizer);
    }
    case 'jsonl-rows': {
      const { parseJsonl } = await import('../jobs/data.ts');
      return parseJsonl(task.bytes, task.field, task.maxRows).rows.length;
    }
    case 'training-data': {
      const { parseInlineRows, parseJsonl, tokenizeTrainingRows } = await import('../jobs/data.ts');
      const { tokenizer, maxPositions } = await model(task.modelDir);
      const field = 'jsonl' in task.data ? task.data.field : 'data';
      const parsed: ParsedRows =
        'jsonl' in task.data ? parseJsonl(task.data.jsonl, task.data.field, task.maxRows) : parseInlineRows(task.data.rows);
      const chars = trainingChars(parsed.rows);
      if (chars > task.maxChars) throw trainingCharsTooMany({ field, chars, limit: task.maxChars }, field);
      const examples = tokenizeTrainingRows(parsed, tokenizer, maxPositions, field);
      return { rows: examples.length, longestTokens: examples.reduce((n, e) => Math.max(n, e.tokens.length), 0) };
    }
    case 'artifact': {
      const { parseArtifact } = await import('../interventions/artifact.ts');
      return parseArtifact(task.config, task.weights, task.base).config;
    }
    case 'quantize': {
      const [{ quantizeMatrix }, { namedScheme }] = await Promise.all([import('../quant/blocks.ts'), import('../quant/formats.ts')]);
      const scheme = namedScheme(task.scheme);
      if (!scheme) throw new Error(`quantizer: no scheme ${task.scheme}`);
      return quantizeMatrix(task.w, task.rows, task.cols, scheme);
    }
    case 'pyreft': {
      const { importPyreft } = await import('../interventions/pyreft/index.ts');
      return (await importPyreft(task.input, task.base)) satisfies PyreftImportResult;
    }
  }
}
