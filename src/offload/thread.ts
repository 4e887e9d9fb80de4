import { ReftError } from '../errors.ts';
import type { TaskMessage, TaskResult } from './task.ts';

/**
 * A pool thread's side: imports the task's module (once per thread; later tasks reuse it) and
 * runs the named export. Any error comes back as a serialized ReftError.
 */
export async function runTask({ module, name, input }: TaskMessage): Promise<TaskResult> {
  try {
    const run: unknown = ((await import(module)) as Record<string, unknown>)[name];
    if (typeof run !== 'function') throw new Error(`${module} exports no task ${name}`);
    return { ok: true, value: await (run as (input: unknown) => unknown)(input) };
  } catch (e) {
    return { ok: false, error: ReftError.from(e, 'internal error: ').toJSON() };
  }
}
