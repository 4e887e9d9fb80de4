import { sql, type ExpressionBuilder, type Kysely } from 'kysely';
import type { Dialect } from './dialect.ts';
import { one } from './rows.ts';
import { COLUMNS, jsonText, toJob, type Tables } from './schema.ts';
import type { Job, JobStatus, Lease } from './store.ts';

/** How a job ends: the status, and for a failure its error, for a success the intervention made. */
type Ending = { status: JobStatus; error?: string | null; interventionId?: string | null };

/** The job queue's writes, inside a store's transaction: claims, lease guards, numbered events, endings. */
export class JobQueue {
  constructor(private readonly d: Dialect) {}

  /** Takes the next job for `workerId`, ending those a dead worker left cancelled or out of attempts on the way. */
  async claim(tx: Kysely<Tables>, workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: Job; lease: Lease } | null> {
    // Read and taken in the caller's write transaction, the row locked (SQLite: the database), so
    // two workers in any processes never take the same job.
    for (;;) {
      const next = tx
        .selectFrom('jobs')
        .select(COLUMNS.job)
        .where('status', 'in', ['queued', 'running'])
        .where((eb) => eb.or([eb('status', '=', 'queued'), eb('leaseExpiresAt', '<=', this.d.leaseAt(0))]))
        // Fair between tenants: the tenant served longest ago (or never) first, then the oldest job.
        .orderBy(sql`(SELECT max(served.started_at) FROM jobs AS served WHERE served.tenant_id = jobs.tenant_id) ASC NULLS FIRST`)
        .orderBy('seq')
        .limit(1);
      const row = await this.d.lock(next, 'skip').executeTakeFirst();
      if (!row) return null;
      // A cancel requested before its worker died wins over a retry.
      if (row.cancelRequested) {
        await this.end(tx, row.id, { status: 'cancelled' });
        continue;
      }
      if (row.attempts >= maxAttempts) {
        const error = `gave up after ${row.attempts} attempt(s): the worker stopped renewing its lease`;
        await this.end(tx, row.id, { status: 'failed', error });
        continue;
      }
      const claim = tx.updateTable('jobs').set((eb) => ({
        status: 'running',
        attempts: eb('attempts', '+', 1),
        startedAt: eb.fn.coalesce('startedAt', sql<string>`${this.d.now()}`),
        leaseWorker: workerId,
        leaseExpiresAt: this.d.leaseAt(leaseMs),
      }));
      const columns = [...COLUMNS.job, 'leaseExpiresAt as expiresAt'] as const;
      const { expiresAt, ...claimed } = await claim.where('id', '=', row.id).returning(columns).executeTakeFirstOrThrow();
      await this.addEvent(tx, row.id, 'status', { status: 'running', attempt: claimed.attempts });
      return { job: toJob(claimed), lease: { jobId: row.id, workerId, expiresAt: new Date(expiresAt!).getTime() } };
    }
  }

  /** The guard of every worker write: the worker named holds an unexpired lease. */
  leaseHeld(jobId: string, workerId: string) {
    const live = this.d.leaseAt(0);
    return (eb: ExpressionBuilder<Tables, 'jobs'>) =>
      eb.and([eb('id', '=', jobId), eb('status', '=', 'running'), eb('leaseWorker', '=', workerId), eb('leaseExpiresAt', '>', live)]);
  }

  /** Appends an event with the job's next number (the job's row locked, so concurrent appends never collide); undefined when there is no such job. */
  async addEvent(tx: Kysely<Tables>, jobId: string, type: string, data: unknown) {
    if (!(await this.d.lock(tx.selectFrom('jobs').select('id').where('id', '=', jobId), 'row').executeTakeFirst())) return undefined;
    const seq = sql<number>`(SELECT coalesce(max(seq), 0) + 1 FROM job_events WHERE job_id = ${jobId})`;
    const row = { jobId, seq, createdAt: this.d.now(), type, data: jsonText(data) };
    return tx.insertInto('jobEvents').values(row).returning(COLUMNS.event).executeTakeFirstOrThrow();
  }

  /**
   * Ends a job with its 'status' event: one `workerId` holds (finishJob), or whatever its lease
   * (a queued cancel, a claim's give-up). False when the worker no longer holds it.
   */
  async end(tx: Kysely<Tables>, id: string, end: Ending, workerId?: string) {
    const { status, error = null, interventionId = null } = end;
    const set = { status, error, interventionId, finishedAt: this.d.now(), leaseWorker: null, leaseExpiresAt: null };
    const held = workerId === undefined ? (eb: ExpressionBuilder<Tables, 'jobs'>) => eb('id', '=', id) : this.leaseHeld(id, workerId);
    if (!one(await tx.updateTable('jobs').set(set).where(held).executeTakeFirst())) return false;
    const event = { status, ...(error !== null && { error }), ...(interventionId !== null && { intervention_id: interventionId }) };
    await this.addEvent(tx, id, 'status', event);
    return true;
  }
}
