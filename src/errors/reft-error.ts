/**
 * The general kind of an error: what the HTTP status, the OpenAI error `type` and clients that
 * only tell "bad input" from "not found" key on. Every catalogue entry has one.
 */
export type Category =
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

export const CATEGORY_STATUS: Record<Category, number> = {
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

/**
 * Every code the catalogue declares, as keys. Empty here: catalogue.ts adds them (declaration
 * merging), so this file, which every area's declarations import, need not import the catalogue.
 */
export interface DeclaredCodes {}

/** A specific code, or a category's generic one. */
export type ErrorCode = keyof DeclaredCodes;

/** Where a problem type is documented: served by the server itself (GET /problems/{code}). */
export const problemTypeOf = (code: string) => `/problems/${code}`;

export interface ErrorOptions {
  /** Sent as Retry-After (seconds). */
  retryAfterSeconds?: number;
  /** The underlying failure, for the log; never sent to clients. */
  cause?: unknown;
}

/** What one catalogue entry declares about its error, whatever its message's parameters. */
export interface ErrorDeclaration {
  readonly code: string;
  readonly category: Category;
  readonly status: number;
  /** Short summary of the problem type (RFC 9457 `title`): the same for every occurrence. */
  readonly title: string;
  /** RFC 9457 `type`: a reference that resolves, against the server's URL, to this entry's page. */
  readonly type: string;
}

type MessageOf<P> = (params: P) => string;

/** An entry's constructor: message parameters (if its template has any), the field at fault, options. */
export type ErrorFactory<C extends string, P> = ErrorDeclaration & { readonly code: C; readonly message: MessageOf<P> } & ([P] extends [
    void,
  ]
    ? (field?: string, options?: ErrorOptions) => ReftError
    : (params: P, field?: string, options?: ErrorOptions) => ReftError);

const declarations = new Map<string, ErrorDeclaration>();

/** Every declaration so far, in declaration order (the catalogue imports every area first). */
export const declared = (): ErrorDeclaration[] => [...declarations.values()];

const titleOf = (code: string) => code.charAt(0).toUpperCase() + code.slice(1).replaceAll('_', ' ');

/**
 * Declares one specific error, the way fastify's lib/errors.js declares each FST_ERR_*: its
 * stable code, its category (which sets the HTTP status unless `status` says otherwise) and its
 * message template. Returns the function that builds it.
 */
export function defineError<C extends string, P = void>(
  code: C,
  category: Category,
  message: MessageOf<P>,
  extra: { status?: number; title?: string } = {},
): ErrorFactory<C, P> {
  if (declarations.has(code)) throw new TypeError(`error code ${code} is declared twice`);
  const declaration: ErrorDeclaration = {
    code,
    category,
    status: extra.status ?? CATEGORY_STATUS[category],
    title: extra.title ?? titleOf(code),
    type: problemTypeOf(code),
  };
  declarations.set(code, declaration);
  const takesParams = message.length > 0;
  const build = (...args: unknown[]): ReftError => {
    const [params, field, options] = takesParams ? args : [undefined, ...args];
    const o = options as ErrorOptions | undefined;
    const e = new ReftError(code as ErrorCode, message(params as P), field as string | undefined, o?.retryAfterSeconds);
    if (o?.cause !== undefined) e.cause = o.cause;
    return e;
  };
  return Object.assign(build, declaration, { message }) as unknown as ErrorFactory<C, P>;
}

export function declarationOf(code: string): ErrorDeclaration | undefined {
  return declarations.get(code);
}

/**
 * Typed errors shared by every layer. Each carries its catalogue entry's specific `code` and
 * general `category`, the HTTP status they map to (RFC 9457 problem+json at the HTTP edge) and,
 * where one input is at fault, the `field` that names it (a JSON path, a tensor name, a file name).
 * `new ReftError(category, …)` still works: a category is also the code of its generic entry.
 */
export class ReftError extends Error {
  readonly code: ErrorCode;
  readonly category: Category;
  readonly status: number;
  readonly title: string;
  readonly type: string;
  constructor(
    code: ErrorCode,
    message: string,
    readonly field?: string,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = 'ReftError';
    // a code this build doesn't know (a newer worker's) still travels, as an internal error
    const d = declarations.get(code) ?? declarations.get('internal')!;
    this.code = d.code as ErrorCode;
    this.category = d.category;
    this.status = d.status;
    this.title = d.title;
    this.type = d.type;
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

  /** The same error about another field (and message): for re-basing a nested error's path. */
  withField(message: string, field: string | undefined): ReftError {
    return new ReftError(this.code, message, field, this.retryAfterSeconds);
  }
}

export interface SerializedError {
  code: ErrorCode;
  message: string;
  field?: string;
  retryAfterSeconds?: number;
}
