/**
 * The server's HTTP API as the page uses it: the tab's API key as the Bearer header, problem+json
 * errors as ApiError (with the field they name), and server-sent events read from fetch (an
 * EventSource can't send the Authorization header).
 */
export interface Problem {
  status: number;
  code: string;
  detail: string;
  title?: string;
  field?: string;
}

export class ApiError extends Error {
  constructor(readonly problem: Problem) {
    super(problem.detail);
  }
}

const KEY = 'reft-server.api-key';

/** The API key, kept for this tab only (sessionStorage), never in the page's markup or URL. */
export const apiKey = {
  get: (): string | null => sessionStorage.getItem(KEY),
  set: (key: string): void => sessionStorage.setItem(KEY, key),
  clear: (): void => sessionStorage.removeItem(KEY),
};

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const key = apiKey.get();
  return { ...(key ? { authorization: `Bearer ${key}` } : {}), ...extra };
}

/** A problem from any error body the server sends (problem+json, or OpenAI's shape on its routes). */
async function problemOf(res: Response): Promise<Problem> {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.code === 'string') return { ...body, status: res.status };
    if (body?.error)
      return { status: res.status, code: String(body.error.code ?? body.error.type), detail: body.error.message, field: body.error.param };
  } catch {
    /* not JSON: say what came */
  }
  return { status: res.status, code: 'http_error', detail: text.slice(0, 300) || res.statusText };
}

async function send(method: string, path: string, body?: unknown, extra: Record<string, string> = {}, signal?: AbortSignal) {
  const isForm = body instanceof FormData;
  const res = await fetch(path, {
    method,
    headers: headers(body === undefined || isForm ? extra : { 'content-type': 'application/json', ...extra }),
    body: body === undefined ? undefined : isForm ? body : JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw new ApiError(await problemOf(res));
  return res;
}

export async function call<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
  const res = await send(method, path, body, {}, signal);
  if (res.status === 204) return undefined as T;
  return (await res.json()) as T;
}

/** Each `data:` payload of a server-sent-events response, parsed, as it arrives. */
export async function* stream<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): AsyncGenerator<T> {
  const res = await send(method, path, body, { accept: 'text/event-stream' }, signal);
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame
        .split('\n')
        .filter((l) => l.startsWith('data: '))
        .map((l) => l.slice(6))
        .join('\n');
      if (data && data !== '[DONE]') yield JSON.parse(data) as T;
    }
  }
}

/** Saves a file the API serves (with the key, so not a plain link). */
export async function download(path: string, filename: string): Promise<void> {
  const res = await send('GET', path);
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A page of a list route, followed to its end (bounded). */
export async function listAll<T>(path: string, maxPages = 20): Promise<T[]> {
  const out: T[] = [];
  let after: string | null = null;
  for (let i = 0; i < maxPages; i++) {
    const sep = path.includes('?') ? '&' : '?';
    const page: { data: T[]; next_cursor: string | null } = await call(
      'GET',
      `${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ''}`,
    );
    out.push(...page.data);
    if (!page.next_cursor) break;
    after = page.next_cursor;
  }
  return out;
}

// The shapes the page reads.

export interface InterventionConfig {
  interventions: Array<{ kind: string; layer: number; rank: number; positions: string }>;
}

export interface Intervention {
  id: string;
  name: string;
  description: string | null;
  shared: boolean;
  source: string;
  version: number;
  bytes: number;
  config: InterventionConfig;
  created_at: string;
  updated_at: string;
}

export interface AppliedEdit {
  layer: number;
  positions: number[];
  coefficients: number[][];
}

export interface GenerateResult {
  text: string;
  token_ids: number[];
  finish_reason: string;
  usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
  /** With return_coefficients: per request item, per intervention, c(h) at its positions. */
  applied?: AppliedEdit[][];
  /** The text of each prompt token: the columns `applied`'s positions index. */
  prompt_token_texts?: string[];
}

export type GenerateEvent =
  | { type: 'token'; text: string }
  | ({ type: 'done' } & GenerateResult)
  | { type: 'applied'; applied: AppliedEdit[][]; prompt_token_texts?: string[] }
  | { type: 'error'; error: Problem };

export interface Job {
  id: string;
  status: 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
  name: string | null;
  error: string | null;
  intervention_id: string | null;
}

export interface JobEvent {
  type: string;
  data?: { step?: number; total_steps?: number; loss?: number; tokens_per_second?: number; eta_seconds?: number; message?: string };
  job?: Job;
}
