import type { SerializedError } from '../errors.ts';

/**
 * A function that runs in a pool thread: a named export of a module that the thread imports by
 * URL. The pool knows no task of its own (it imports no domain code); each owner declares its
 * tasks beside the code they run, e.g. `offloadTask(import.meta.url, { parseJsonBytes })`, and
 * a thread loads only the modules of the tasks it is given.
 */
export interface OffloadTask<I, O> {
  /** The URL of the module that exports the function. */
  readonly module: string;
  readonly name: string;
  /** Never set: carries the function's input and output types to `OffloadPool.run`. */
  readonly signature?: (input: I) => O;
}

/**
 * Declares the one function in `exported` (written `{ fn }`, so its key is its export name) as a
 * task. It takes one argument, and its argument and result cross threads by structured clone.
 */
export function offloadTask<I, O>(module: string, exported: Record<string, (input: I) => O>): OffloadTask<I, Awaited<O>> {
  const names = Object.keys(exported);
  if (names.length !== 1) throw new TypeError(`offloadTask: one function, as { fn } (got ${names.length})`);
  return { module, name: names[0] };
}

/** What the pool sends a thread. */
export interface TaskMessage {
  module: string;
  name: string;
  input: unknown;
}

/** What a thread sends back: a task's errors travel serialized, as ReftErrors. */
export type TaskResult = { ok: true; value: unknown } | { ok: false; error: SerializedError };
