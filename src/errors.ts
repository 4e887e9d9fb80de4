import type { ZodError } from 'zod';

/**
 * Typed errors shared by every layer. Each carries a stable `code`, the HTTP status it maps to
 * (RFC 9457 problem+json at the HTTP edge) and, where one input is at fault, the `field` that
 * names it (a JSON path, a tensor name, a file name).
 */
export type ErrorCode =
  | 'invalid_request'
  | 'invalid_model'
  | 'unsupported_model'
  | 'invalid_intervention'
  | 'invalid_checkpoint'
  | 'context_length_exceeded'
  | 'not_found'
  | 'conflict'
  | 'unauthorized'
  | 'forbidden'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'rate_limited'
  | 'quota_exceeded'
  | 'overloaded'
  | 'unavailable'
  | 'internal';

const STATUS: Record<ErrorCode, number> = {
  invalid_request: 400,
  invalid_model: 400,
  unsupported_model: 400,
  invalid_intervention: 400,
  invalid_checkpoint: 400,
  context_length_exceeded: 400,
  not_found: 404,
  conflict: 409,
  unauthorized: 401,
  forbidden: 403,
  payload_too_large: 413,
  unsupported_media_type: 415,
  rate_limited: 429,
  // a full quota stays full until something is deleted: not a 429, which clients retry
  quota_exceeded: 403,
  overloaded: 503,
  unavailable: 503,
  internal: 500,
};

export class ReftError extends Error {
  readonly status: number;
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly field?: string,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = 'ReftError';
    this.status = STATUS[code];
  }

  /** Plain object that survives structured clone (worker threads, child processes). */
  toJSON(): SerializedError {
    return { code: this.code, message: this.message, field: this.field, retryAfterSeconds: this.retryAfterSeconds };
  }

  /** `e` itself if typed, else an internal error carrying its message (prefixed with `context`). */
  static from(e: unknown, context = ''): ReftError {
    if (e instanceof ReftError) return e;
    return new ReftError('internal', `${context}${(e as Error)?.message ?? String(e)}`);
  }

  static fromJSON(e: SerializedError): ReftError {
    return new ReftError(e.code, e.message, e.field, e.retryAfterSeconds);
  }
}

export interface SerializedError {
  code: ErrorCode;
  message: string;
  field?: string;
  retryAfterSeconds?: number;
}

export const invalidRequest = (message: string, field?: string) => new ReftError('invalid_request', message, field);
export const invalidIntervention = (message: string, field?: string) => new ReftError('invalid_intervention', message, field);
export const invalidCheckpoint = (message: string, field?: string) => new ReftError('invalid_checkpoint', message, field);
export const unsupportedModel = (message: string, field?: string) => new ReftError('unsupported_model', message, field);
export const notFound = (message: string, field?: string) => new ReftError('not_found', message, field);
/** The 404 of every lookup: the same words whether the thing is missing or another tenant's. */
export const noSuch = (kind: string, id: string, field = 'id') => new ReftError('not_found', `no ${kind} "${id}"`, field);

/**
 * The first problem zod found, with the field it is about as a dotted path under `prefix`
 * (an unknown key is named by itself: `reft_config.json.extra`).
 */
export function firstIssue(error: ZodError, prefix: string[] = []): { field: string; message: string } {
  const issue = error.issues[0];
  const keys = issue.code === 'unrecognized_keys' ? issue.keys : [];
  return { field: [...prefix, ...issue.path.map(String), ...keys.slice(0, 1)].join('.'), message: issue.message };
}
