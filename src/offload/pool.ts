import { join } from 'node:path';
import { Piscina } from 'piscina';
import { ReftError } from '../errors.ts';
import type { OffloadTask, TaskMessage, TaskResult } from './task.ts';

/**
 * A small pool of worker threads for CPU-heavy work (the server's parsing of large JSON bodies,
 * tokenization, training data, pyreft pickles; quantizing a checkpoint's rows), so none of it
 * stalls the event loop: /healthz and every other tenant keep being answered while it runs.
 * What runs is the caller's: a task names a module and its export (task.ts). Inputs are bounded
 * before they are sent here.
 */
export class OffloadPool {
  private readonly pool: Piscina;

  constructor(threads = 2) {
    this.pool = new Piscina({ filename: join(import.meta.dirname, 'entry.mjs'), minThreads: 1, maxThreads: threads, idleTimeout: 60_000 });
  }

  /** Runs `task` on `input` in a thread; buffers in `transferList` are moved there, not copied. */
  async run<I, O>(task: OffloadTask<I, O>, input: I, transferList: ArrayBuffer[] = []): Promise<O> {
    const message: TaskMessage = { module: task.module, name: task.name, input };
    const r = (await this.pool.run(message, { transferList })) as TaskResult;
    if (!r.ok) throw ReftError.fromJSON(r.error);
    return r.value as O;
  }

  close(): Promise<void> {
    return this.pool.destroy();
  }
}
