import { z } from 'zod';
import {
  ReftError,
  fileNotFound,
  trainingDataEmpty,
  trainingFileNotUtf8,
  trainingLineNotJson,
  trainingRowInvalid,
  trainingCharsTooMany,
  trainingRowsTooMany,
} from '../errors.ts';
import { cachedTokenizer } from '../model/load.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import { offloadTask } from '../offload/task.ts';
import { messageSchema } from '../prompts/prompt-input.ts';
import type { Store } from '../storage/store.ts';
import { tokenizeRows, type TrainingExample, type TrainingRow } from '../training/index.ts';

/**
 * Training data: JSONL files (one row per line) or inline rows, each `{prompt, completion}` or
 * `{messages: [...]}`. Errors name the line (files) or the index (inline rows).
 */
const MAX_TRAINING_ROWS = 100_000;

/**
 * The server's default bounds on one training file or job, checked before anything is tokenized
 * (tokenizing costs tens of µs a character with the JS tokenizer): characters of training text
 * (prompt + completion / message contents, all rows), and rows.
 */
export const DEFAULT_MAX_TRAINING_CHARS = 4_000_000;
export const DEFAULT_MAX_TRAINING_ROWS = 10_000;

const trainingRowSchema = z.union([
  z.strictObject({ prompt: z.string().min(1).max(1_000_000), completion: z.string().min(1).max(1_000_000) }),
  z.strictObject({ messages: z.array(messageSchema).min(2).max(1024) }),
]);

/** Where a row came from, for error messages: "line 7" or "data.6". */
export type RowOrigin = { kind: 'file'; lines: number[] } | { kind: 'inline' };

export interface ParsedRows {
  rows: TrainingRow[];
  origin: RowOrigin;
}

function describeRowError(error: z.ZodError): string {
  const issue = error.issues[0];
  if (issue.code === 'invalid_union') return 'a row is {"prompt", "completion"} (strings) or {"messages": [{"role", "content"}, ...]}';
  return `${issue.path.join('.') || 'row'}: ${issue.message}`;
}

export function parseJsonl(bytes: Uint8Array, field = 'training_file', maxRows = MAX_TRAINING_ROWS): ParsedRows {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw trainingFileNotUtf8({ field }, field);
  }
  const rows: TrainingRow[] = [];
  const lines: number[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (!line) return;
    let json: unknown;
    try {
      json = JSON.parse(line);
    } catch {
      throw trainingLineNotJson({ field, line: i + 1 }, `${field}:line ${i + 1}`);
    }
    const row = trainingRowSchema.safeParse(json);
    if (!row.success)
      throw trainingRowInvalid({ at: `${field}: line ${i + 1}`, problem: describeRowError(row.error) }, `${field}:line ${i + 1}`);
    rows.push(row.data);
    lines.push(i + 1);
    if (rows.length > maxRows) throw trainingRowsTooMany({ field, limit: maxRows }, field);
  });
  if (rows.length === 0) throw trainingDataEmpty({ what: `${field}: the file` }, field);
  return { rows, origin: { kind: 'file', lines } };
}

function parseInlineRows(data: unknown[]): ParsedRows {
  const rows = data.map((json, i) => {
    const row = trainingRowSchema.safeParse(json);
    if (!row.success) throw trainingRowInvalid({ at: `data.${i}`, problem: describeRowError(row.error) }, `data.${i}`);
    return row.data;
  });
  return { rows, origin: { kind: 'inline' } };
}

/** Tokenizes rows, rewriting the trainer's `data.<i>` fields into the row's origin. */
export function tokenizeTrainingRows(
  parsed: ParsedRows,
  tokenizer: TextTokenizer,
  maxLength: number,
  field = 'training_file',
): TrainingExample[] {
  try {
    return tokenizeRows(parsed.rows, tokenizer, maxLength);
  } catch (e) {
    if (!(e instanceof ReftError) || parsed.origin.kind === 'inline') throw e;
    const m = /^data\.(\d+)/.exec(e.field ?? '');
    if (!m) throw e;
    const line = parsed.origin.lines[Number(m[1])];
    throw e.withField(e.message.replace(/^data\.\d+/, `${field}: line ${line}`), `${field}:line ${line}`);
  }
}

/**
 * tokenizeTrainingRows, a row at a time, handing the event loop back every few milliseconds:
 * a worker tokenizing a large job keeps renewing its lease and answers SIGTERM meanwhile.
 */
export async function tokenizeTrainingRowsYielding(
  parsed: ParsedRows,
  tokenizer: TextTokenizer,
  maxLength: number,
  signal?: AbortSignal,
  field = 'training_file',
): Promise<TrainingExample[]> {
  const out: TrainingExample[] = [];
  let since = performance.now();
  for (let i = 0; i < parsed.rows.length; i++) {
    const one: ParsedRows = {
      rows: [parsed.rows[i]],
      origin: parsed.origin.kind === 'file' ? { kind: 'file', lines: [parsed.origin.lines[i]] } : parsed.origin,
    };
    try {
      out.push(...tokenizeTrainingRows(one, tokenizer, maxLength, field));
    } catch (e) {
      // a single-row batch names its row data.0: give it its real index
      if (e instanceof ReftError && parsed.origin.kind === 'inline' && e.field?.startsWith('data.0')) {
        throw e.withField(e.message.replace(/^data\.0/, `data.${i}`), e.field.replace(/^data\.0/, `data.${i}`));
      }
      throw e;
    }
    if (performance.now() - since > 20) {
      await new Promise((resolve) => setImmediate(resolve));
      signal?.throwIfAborted();
      since = performance.now();
    }
  }
  return out;
}

/** A tenant's uploaded training file (a 404 naming training_file if it's gone). */
export async function fileBytes(store: Store, tenantId: string, file: string): Promise<Uint8Array> {
  const bytes = await store.readFile(tenantId, file);
  if (!bytes) throw fileNotFound({ id: file }, 'training_file');
  return bytes;
}

/** A job's rows: inline, or the tenant's uploaded file. */
export async function jobRows(store: Store, tenantId: string, data: { file: string } | { rows: unknown[] }): Promise<ParsedRows> {
  if ('rows' in data) return parseInlineRows(data.rows);
  return parseJsonl(await fileBytes(store, tenantId, data.file), 'training_file');
}

/** Characters the rows hold, counted without copying them. */
function trainingChars(rows: readonly TrainingRow[]): number {
  let n = 0;
  for (const row of rows) {
    if ('messages' in row) for (const m of row.messages) n += m.content.length;
    else n += row.prompt.length + row.completion.length;
  }
  return n;
}

/**
 * In an offload pool thread: parses and tokenizes a job's rows (as the worker will), within the
 * text budgets, so a bad row is refused when the job is created. Returns the row count and the
 * longest row's tokens.
 */
export async function checkTrainingData(task: {
  modelDir: string;
  data: { jsonl: Uint8Array; field: string } | { rows: unknown[] };
  maxChars: number;
  maxRows: number;
}): Promise<{ rows: number; longestTokens: number }> {
  const { tokenizer, maxPositions } = await cachedTokenizer(task.modelDir);
  const field = 'jsonl' in task.data ? task.data.field : 'data';
  const parsed = 'jsonl' in task.data ? parseJsonl(task.data.jsonl, task.data.field, task.maxRows) : parseInlineRows(task.data.rows);
  const chars = trainingChars(parsed.rows);
  if (chars > task.maxChars) throw trainingCharsTooMany({ field, chars, limit: task.maxChars }, field);
  const examples = tokenizeTrainingRows(parsed, tokenizer, maxPositions, field);
  return { rows: examples.length, longestTokens: examples.reduce((n, e) => Math.max(n, e.tokens.length), 0) };
}

/** In an offload pool thread: validates an uploaded JSONL file; returns its row count. */
export function countJsonlRows({ bytes, field, maxRows }: { bytes: Uint8Array; field: string; maxRows: number }): number {
  return parseJsonl(bytes, field, maxRows).rows.length;
}

export const CHECK_TRAINING_DATA = offloadTask(import.meta.url, { checkTrainingData });
export const COUNT_JSONL_ROWS = offloadTask(import.meta.url, { countJsonlRows });
