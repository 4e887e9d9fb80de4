import type { FastifyBaseLogger } from 'fastify';
import type { Store } from '../storage/store.ts';
import { utcDay } from '../storage/usage.ts';

/**
 * Token usage per tenant, counted as requests finish and written to the store in batches (a
 * write per request would put the database on the hot path). Counts that can't be written yet
 * (the database is away) stay and go with the next flush; `close` flushes what is left.
 */
export interface UsageCounts {
  requests?: number;
  promptTokens?: number;
  completionTokens?: number;
  trainingTokens?: number;
}

export class UsageMeter {
  private pending = new Map<string, Required<UsageCounts> & { tenantId: string; day: string }>();
  private readonly timer: NodeJS.Timeout;
  private flushing: Promise<void> | null = null;

  constructor(
    private readonly store: Store,
    private readonly log: FastifyBaseLogger,
    flushMs = 5_000,
  ) {
    this.timer = setInterval(() => void this.flush(), flushMs);
    this.timer.unref();
  }

  add(tenantId: string, counts: UsageCounts): void {
    const day = utcDay();
    const key = `${tenantId}/${day}`;
    const row = this.pending.get(key) ?? { tenantId, day, requests: 0, promptTokens: 0, completionTokens: 0, trainingTokens: 0 };
    row.requests += counts.requests ?? 0;
    row.promptTokens += counts.promptTokens ?? 0;
    row.completionTokens += counts.completionTokens ?? 0;
    row.trainingTokens += counts.trainingTokens ?? 0;
    this.pending.set(key, row);
  }

  /** Writes the pending counts; on failure they are merged back for the next attempt. */
  flush(): Promise<void> {
    if (this.flushing) return this.flushing;
    if (this.pending.size === 0) return Promise.resolve();
    const batch = [...this.pending.values()];
    this.pending = new Map();
    this.flushing = this.store
      .recordUsage(batch)
      .catch((err) => {
        this.log.warn({ err: (err as Error).message, rows: batch.length }, 'usage not recorded yet; will retry');
        for (const row of batch) this.add(row.tenantId, row);
      })
      .finally(() => {
        this.flushing = null;
      });
    return this.flushing;
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.flush();
  }
}
