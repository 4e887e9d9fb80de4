import { sql, type Expression, type ExpressionBuilder, type Kysely, type SelectQueryBuilder } from 'kysely';
import { ReftError } from '../errors.ts';
import { newId } from './ids.ts';
import { interventionRecord } from './intervention-record.ts';
import { endInsteadOfClaim, endedEvent, outcomeColumns, queuedEvent, runningEvent } from './job-lifecycle.ts';
import { Listeners } from './listeners.ts';
import { clampLimit, pageOf, seqAfter } from './paging.ts';
import { COLUMNS, jsonText, toEvent, toFile, toIntervention, toJob, toKey, toTenant } from './schema.ts';
import type { BlobColumns, EventRow, Json, Tables } from './schema.ts';
import { interventionNameTaken, keySecretTaken, noIntervention, noInterventionToReplace, noJob, noTenant } from './store-errors.ts';
import { checkUsageRange, toUsageDay, usageBatch } from './usage.ts';
import type * as S from './store.ts';

/**
 * The Store, once for both databases, over Kysely. What differs between SQLite and PostgreSQL is
 * a Dialect (sqlite-store.ts, postgres-store.ts): the clock, row locks, where file bytes live,
 * how event numbers are made, the usage upsert, notifications and error translation.
 */

export type Value<T> = T | Expression<T>;
export type Channel = 'interventionChanged' | 'jobQueued';
type AnySelect = SelectQueryBuilder<any, any, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

export interface Dialect {
  readonly db: Kysely<Tables>;
  /** Now, for timestamps (ISO text). */
  now(): Value<string>;
  /** Now, and `ms` from now, in the terms of jobs.lease_expires_at. */
  leaseNow(): Value<number | string>;
  leaseUntil(ms: number): Value<number | string>;
  flag(value: boolean): boolean | number;
  /** Locks the rows a select reads until the commit; 'skip' passes over rows others hold. */
  lock<Q extends AnySelect>(query: Q, mode: 'row' | 'skip'): Q;
  /** Appends an event with the job's next seq; undefined when there is no such job. */
  addEvent(tx: Kysely<Tables>, jobId: string, type: string, data: Json, at: Value<string>): Promise<EventRow | undefined>;
  /** Adds a usageBatch's rows (those of tenants that exist) to the stored counts. */
  addUsage(tx: Kysely<Tables>, rows: S.UsageRecord[]): Promise<void>;
  /** Tells other processes, on commit (or nothing, where the database can't). */
  notify(tx: Kysely<Tables>, channel: Channel, payload: string): Promise<void>;
  violation(e: unknown): 'unique' | 'foreignKey' | undefined;
  /** A transaction that failed this way is run again (deadlock, serialization failure). */
  retryable(e: unknown): boolean;
  /** The error a caller sees for an error of the database. */
  toStoreError(e: unknown): unknown;
  readonly blobs: Blobs;
  close(): Promise<void>;
}

export type BlobKind = 'config' | 'weights' | 'data' | 'ckpt';

/** Where file bytes live: in their rows' columns, or in files the columns name. */
export interface Blobs {
  readonly columns: BlobColumns;
  /** Whether the column values name files, which must be released after the rows naming them go. */
  readonly external: boolean;
  /** Where they are (for errors). */
  readonly where: string;
  /** Before a write transaction: the column values for `bytes`. */
  stage(owner: string, kinds: BlobKind[], bytes: Uint8Array[]): Promise<StagedBlobs>;
  /** The bytes of column values; null if a file has vanished (replaced or deleted meanwhile: read the row again). */
  read(values: unknown[]): Promise<Uint8Array[] | null>;
  /** After a commit: drops files no row names any more. */
  release(values: unknown[]): Promise<void>;
}

export interface StagedBlobs {
  readonly values: unknown[];
  /** Inside the write transaction, before writing the rows that name them. */
  promote(): void;
  /** After the transaction: cleans up what no committed row names. */
  settle(committed: boolean): Promise<void>;
}

interface Violations {
  unique?: () => ReftError;
  foreignKey?: () => ReftError;
}

/** Re-reads of a row whose blob vanished under us (replaced or deleted between two reads). */
const BLOB_READ_RETRIES = 3;
/** Attempts of a transaction that fails with a deadlock or serialization failure. */
const TRANSACTION_ATTEMPTS = 3;

export class SqlStore implements S.Store {
  readonly interventionListeners = new Listeners<[id: string]>();
  readonly jobListeners = new Listeners<[]>();
  private readonly db: Kysely<Tables>;
  private readonly blobs: Blobs;
  private closing: Promise<void> | null = null;

  constructor(private readonly d: Dialect) {
    this.db = d.db;
    this.blobs = d.blobs;
  }

  // --- tenants and keys ---------------------------------------------------------------------

  async createTenant(name: string): Promise<S.Tenant> {
    const values = { id: newId('tenant'), name, created_at: this.d.now() };
    return toTenant(await this.db.insertInto('tenants').values(values).returning(COLUMNS.tenant).executeTakeFirstOrThrow());
  }

  async getTenant(id: string): Promise<S.Tenant | null> {
    const row = await this.db.selectFrom('tenants').select(COLUMNS.tenant).where('id', '=', id).executeTakeFirst();
    return row ? toTenant(row) : null;
  }

  async listTenants(page: S.PageRequest): Promise<S.Page<S.Tenant>> {
    return this.page(this.db.selectFrom('tenants'), COLUMNS.tenant, page, toTenant);
  }

  async createApiKey(tenantId: string, secretHash: string): Promise<S.ApiKey> {
    const values = { id: newId('key'), tenant_id: tenantId, secret_hash: secretHash, created_at: this.d.now() };
    const insert = this.db.insertInto('api_keys').values(values).returning(COLUMNS.key);
    return toKey(await this.named(insert.executeTakeFirstOrThrow(), { foreignKey: () => noTenant(tenantId), unique: keySecretTaken }));
  }

  async findApiKey(secretHash: string): Promise<{ key: S.ApiKey; tenant: S.Tenant } | null> {
    const row = await this.db
      .selectFrom('api_keys as k')
      .innerJoin('tenants as t', 't.id', 'k.tenant_id')
      .select(['k.id', 'k.tenant_id', 'k.created_at', 'k.revoked_at', 't.name', 't.created_at as tenant_created_at'])
      .where('k.secret_hash', '=', secretHash)
      .where('k.revoked_at', 'is', null)
      .executeTakeFirst();
    return row ? { key: toKey(row), tenant: toTenant({ id: row.tenant_id, name: row.name, created_at: row.tenant_created_at }) } : null;
  }

  async revokeApiKey(id: string): Promise<boolean> {
    const revoke = this.db.updateTable('api_keys').set({ revoked_at: this.d.now() }).where('id', '=', id).where('revoked_at', 'is', null);
    return (await revoke.executeTakeFirst()).numUpdatedRows === 1n;
  }

  // --- interventions ------------------------------------------------------------------------

  async putIntervention(iv: S.NewIntervention, replaceId?: string): Promise<S.InterventionMeta> {
    // Refuses a replaceId the store could not have made: the id may become part of file names.
    const r = interventionRecord(iv, replaceId);
    const b = this.blobs.columns;
    const values = { name: r.name, description: r.description, source: r.source, config: r.config, bytes: r.bytes, sha256: r.sha256 };
    let replaced: unknown[] = [];
    const write = this.withBlobs(r.id, ['config', 'weights'], [iv.files.config, iv.files.weights], async (tx, staged) => {
      const files = { [b.config]: staged.values[0], [b.weights]: staged.values[1] } as object;
      const now = this.d.now();
      if (replaceId === undefined) {
        staged.promote();
        const row = { ...values, ...files, id: r.id, tenant_id: r.tenantId, version: 1, created_at: now, updated_at: now };
        return tx.insertInto('interventions').values(row).returning(COLUMNS.intervention).executeTakeFirstOrThrow();
      }
      const own = tx.selectFrom('interventions').where('id', '=', replaceId).where('tenant_id', 'is not distinct from', r.tenantId);
      if (!(await this.d.lock(own.select('id'), 'row').executeTakeFirst())) throw noInterventionToReplace(replaceId);
      replaced = await this.blobsOf(own, [b.config, b.weights]);
      staged.promote();
      const row = await tx
        .updateTable('interventions')
        .set((eb) => ({ ...values, ...files, version: eb('version', '+', 1), updated_at: now }))
        .where('id', '=', replaceId)
        .returning(COLUMNS.intervention)
        .executeTakeFirstOrThrow();
      await this.d.notify(tx, 'interventionChanged', r.id);
      return row;
    });
    const row = await this.named(write, { unique: () => interventionNameTaken(iv.name), foreignKey: () => noTenant(iv.tenantId) });
    if (replaceId !== undefined) {
      // Only now, after the commit, are the old files unreferenced.
      await this.blobs.release(replaced);
      this.interventionListeners.emit(r.id);
    }
    return toIntervention(row);
  }

  async findIntervention(tenantId: string | null, idOrName: string): Promise<S.InterventionMeta | null> {
    // An id match first, then the tenant's own name, then a shared name.
    const row = await this.visible(tenantId)
      .select(COLUMNS.intervention)
      .where((eb) => eb.or([eb('id', '=', idOrName), eb('name', '=', idOrName)]))
      .orderBy(sql`id = ${idOrName}`, 'desc')
      .orderBy(sql`tenant_id IS NULL`)
      .limit(1)
      .executeTakeFirst();
    return row ? toIntervention(row) : null;
  }

  async listInterventions(tenantId: string | null, page: S.PageRequest): Promise<S.Page<S.InterventionMeta>> {
    return this.page(this.visible(tenantId), COLUMNS.intervention, page, toIntervention);
  }

  async readInterventionFiles(id: string): Promise<S.InterventionFiles | null> {
    const { config, weights } = this.blobs.columns;
    const found = await this.readBlobs(this.db.selectFrom('interventions').where('id', '=', id), [config, weights]);
    return found ? { config: found[0], weights: found[1] } : null;
  }

  async deleteIntervention(tenantId: string | null, id: string): Promise<boolean> {
    const { config, weights } = this.blobs.columns;
    const deleted = await this.tx(async (tx) => {
      const own = tx.selectFrom('interventions').where('id', '=', id).where('tenant_id', 'is not distinct from', tenantId);
      const files = await this.blobsOf(own, [config, weights]);
      const gone = await tx.deleteFrom('interventions').where('id', '=', id).where('tenant_id', 'is not distinct from', tenantId).executeTakeFirst();
      if (gone.numDeletedRows !== 1n) return null;
      await this.d.notify(tx, 'interventionChanged', id);
      return files;
    });
    if (!deleted) return false;
    // The row is gone (committed) first, so a crash here leaves only orphans for the sweep.
    await this.blobs.release(deleted);
    this.interventionListeners.emit(id);
    return true;
  }

  async storedUsage(tenantId: string): Promise<S.StoredUsage> {
    const row = await this.db
      .selectFrom('interventions')
      .select([sql<number>`count(*)`.as('interventions'), sql<number>`cast(coalesce(sum(bytes), 0) as bigint)`.as('bytes')])
      .where('tenant_id', '=', tenantId)
      .executeTakeFirstOrThrow();
    return { interventions: Number(row.interventions), bytes: Number(row.bytes) };
  }

  // --- usage accounting ---------------------------------------------------------------------

  async recordUsage(entries: S.UsageRecord[]): Promise<void> {
    const rows = usageBatch(entries);
    if (rows.length > 0) await this.tx((tx) => this.d.addUsage(tx, rows));
  }

  async getUsage(tenantId: string, from: string, to: string): Promise<S.UsageDay[]> {
    checkUsageRange(from, to);
    const rows = await this.db
      .selectFrom('tenant_usage')
      .select(['day', 'requests', 'prompt_tokens', 'completion_tokens', 'training_tokens'])
      .where('tenant_id', '=', tenantId)
      .where('day', '>=', from)
      .where('day', '<=', to)
      .orderBy('day')
      .execute();
    return rows.map(toUsageDay);
  }

  // --- training data files ------------------------------------------------------------------

  async putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<S.StoredFile> {
    const id = newId('file');
    const write = this.withBlobs(id, ['data'], [bytes], (tx, staged) => {
      staged.promote();
      const row = { id, tenant_id: tenantId, filename, purpose, bytes: bytes.byteLength, [this.blobs.columns.file]: staged.values[0] };
      return tx.insertInto('files').values({ ...row, created_at: this.d.now() }).returning(COLUMNS.file).executeTakeFirstOrThrow();
    });
    return toFile(await this.named(write, { foreignKey: () => noTenant(tenantId) }));
  }

  async getFile(tenantId: string, id: string): Promise<S.StoredFile | null> {
    const row = await this.db.selectFrom('files').select(COLUMNS.file).where('id', '=', id).where('tenant_id', '=', tenantId).executeTakeFirst();
    return row ? toFile(row) : null;
  }

  async readFile(tenantId: string, id: string): Promise<Uint8Array | null> {
    const found = await this.readBlobs(this.db.selectFrom('files').where('id', '=', id).where('tenant_id', '=', tenantId), [this.blobs.columns.file]);
    return found ? found[0] : null;
  }

  async listFiles(tenantId: string, page: S.PageRequest): Promise<S.Page<S.StoredFile>> {
    return this.page(this.db.selectFrom('files').where('tenant_id', '=', tenantId), COLUMNS.file, page, toFile);
  }

  async deleteFile(tenantId: string, id: string): Promise<boolean> {
    const deleted = await this.tx(async (tx) => {
      const files = await this.blobsOf(tx.selectFrom('files').where('id', '=', id).where('tenant_id', '=', tenantId), [this.blobs.columns.file]);
      const gone = await tx.deleteFrom('files').where('id', '=', id).where('tenant_id', '=', tenantId).executeTakeFirst();
      return gone.numDeletedRows === 1n ? files : null;
    });
    if (!deleted) return false;
    await this.blobs.release(deleted);
    return true;
  }

  // --- training jobs ------------------------------------------------------------------------

  async createJob(tenantId: string, spec: unknown): Promise<S.Job> {
    const id = newId('job');
    const write = this.tx(async (tx) => {
      const values = { id, tenant_id: tenantId, status: 'queued' as const, spec: jsonText(spec), progress: 'null', created_at: this.d.now() };
      const row = await tx.insertInto('jobs').values(values).returning(COLUMNS.job).executeTakeFirstOrThrow();
      await this.addEvent(tx, id, 'status', queuedEvent());
      await this.d.notify(tx, 'jobQueued', id);
      return row;
    });
    const row = await this.named(write, { foreignKey: () => noTenant(tenantId) });
    this.jobListeners.emit();
    return toJob(row);
  }

  async getJob(tenantId: string | null, id: string): Promise<S.Job | null> {
    // A null tenant is the worker or an administrator: any job.
    const job = this.db.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id);
    const row = await (tenantId === null ? job : job.where('tenant_id', '=', tenantId)).executeTakeFirst();
    return row ? toJob(row) : null;
  }

  async listJobs(tenantId: string, page: S.PageRequest): Promise<S.Page<S.Job>> {
    return this.page(this.db.selectFrom('jobs').where('tenant_id', '=', tenantId), COLUMNS.job, page, toJob);
  }

  async requestCancel(tenantId: string, id: string): Promise<S.Job | null> {
    return this.tx(async (tx) => {
      // Locked: a claimer skips the row until we commit, so a queued job can't start meanwhile.
      const job = tx.selectFrom('jobs').select('status').where('id', '=', id).where('tenant_id', '=', tenantId);
      const row = await this.d.lock(job, 'row').executeTakeFirst();
      if (!row) return null;
      // A running job's worker sees cancelRequested when it next reads the job, and finishes it as cancelled.
      if (row.status === 'queued' || row.status === 'running') {
        await tx.updateTable('jobs').set({ cancel_requested: this.d.flag(true) }).where('id', '=', id).execute();
      }
      if (row.status === 'queued') await this.endJob(tx, id, 'cancelled', null);
      return toJob(await tx.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id).executeTakeFirstOrThrow());
    });
  }

  async claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: S.Job; lease: S.Lease } | null> {
    // The candidate is read and taken in one write transaction, its row locked (SQLite: the
    // database), so two workers in any processes never take the same job.
    return this.tx(async (tx) => {
      for (;;) {
        const next = tx
          .selectFrom('jobs')
          .select(COLUMNS.job)
          .where('status', 'in', ['queued', 'running'])
          .where((eb) => eb.or([eb('status', '=', 'queued'), eb('lease_expires_at', '<=', this.d.leaseNow())]))
          .orderBy('seq')
          .limit(1);
        const row = await this.d.lock(next, 'skip').executeTakeFirst();
        if (!row) return null;
        const end = endInsteadOfClaim({ cancelRequested: Boolean(row.cancel_requested), attempts: row.attempts }, maxAttempts);
        if (end) {
          await this.endJob(tx, row.id, end.status, end.error);
          continue;
        }
        const claimed = await tx
          .updateTable('jobs')
          .set((eb) => ({
            status: 'running',
            attempts: eb('attempts', '+', 1),
            started_at: eb.fn.coalesce('started_at', sql<string>`${this.d.now()}`),
            lease_worker: workerId,
            lease_expires_at: this.d.leaseUntil(leaseMs),
          }))
          .where('id', '=', row.id)
          .returning(COLUMNS.job)
          .executeTakeFirstOrThrow();
        await this.addEvent(tx, row.id, 'status', runningEvent(claimed.attempts));
        return { job: toJob(claimed), lease: { jobId: row.id, workerId, expiresAt: new Date(claimed.lease_expires_at!).getTime() } };
      }
    });
  }

  async renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean> {
    const renew = this.db.updateTable('jobs').set({ lease_expires_at: this.d.leaseUntil(leaseMs) }).where(this.leaseHeld(jobId, workerId));
    return (await renew.executeTakeFirst()).numUpdatedRows === 1n;
  }

  async updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean> {
    const update = this.db.updateTable('jobs').set({ progress: jsonText(progress) }).where(this.leaseHeld(jobId, workerId));
    return (await update.executeTakeFirst()).numUpdatedRows === 1n;
  }

  async appendJobEvent(jobId: string, type: string, data: unknown): Promise<S.JobEvent> {
    const row = await this.tx((tx) => this.d.addEvent(tx, jobId, type, jsonText(data), this.d.now()));
    if (!row) throw noJob(jobId);
    return toEvent(row);
  }

  async listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<S.JobEvent[]> {
    const rows = await this.db
      .selectFrom('job_events')
      .select(COLUMNS.event)
      .where('job_id', '=', jobId)
      .where('seq', '>', afterSeq)
      .orderBy('seq')
      .limit(clampLimit(limit))
      .execute();
    return rows.map(toEvent);
  }

  async saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean> {
    const column = this.blobs.columns.checkpoint;
    let replaced: unknown[] = [];
    const saved = await this.withBlobs(jobId, ['ckpt'], [state], async (tx, staged) => {
      // Locked: the lease can't expire into another worker's hands before the commit.
      const held = tx.selectFrom('jobs').select('id').where(this.leaseHeld(jobId, workerId));
      if (!(await this.d.lock(held, 'row').executeTakeFirst())) return false;
      replaced = await this.blobsOf(tx.selectFrom('checkpoints').where('job_id', '=', jobId), [column]);
      staged.promote();
      const row = { job_id: jobId, step, bytes: state.byteLength, created_at: this.d.now(), [column]: staged.values[0] };
      const excluded = Object.fromEntries(['step', 'bytes', 'created_at', column].map((c) => [c, sql.ref(`excluded.${c}`)]));
      await tx.insertInto('checkpoints').values(row).onConflict((oc) => oc.column('job_id').doUpdateSet(excluded)).execute();
      return true;
    });
    await this.blobs.release(replaced);
    return saved;
  }

  async loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null> {
    let step = 0;
    const row = this.db.selectFrom('checkpoints').where('job_id', '=', jobId).select('step');
    const found = await this.readBlobs(row, [this.blobs.columns.checkpoint], (r) => (step = r.step as number));
    return found ? { step, state: found[0] } : null;
  }

  async finishJob(jobId: string, workerId: string, outcome: S.JobOutcome): Promise<boolean> {
    const { error, interventionId } = outcomeColumns(outcome);
    const write = this.tx(async (tx) => {
      const finished = await tx
        .updateTable('jobs')
        .set({ status: outcome.status, error, intervention_id: interventionId, finished_at: this.d.now(), lease_worker: null, lease_expires_at: null })
        .where(this.leaseHeld(jobId, workerId))
        .executeTakeFirst();
      if (finished.numUpdatedRows !== 1n) return false;
      await this.addEvent(tx, jobId, 'status', endedEvent(outcome.status, error, interventionId));
      return true;
    });
    return this.named(write, { foreignKey: () => noIntervention(interventionId) });
  }

  // --- listeners and lifecycle --------------------------------------------------------------

  onInterventionChanged(listener: (id: string) => void): () => void {
    return this.interventionListeners.add(listener);
  }

  onJobQueued(listener: () => void): () => void {
    return this.jobListeners.add(listener);
  }

  async close(): Promise<void> {
    this.closing ??= this.d.close();
    return this.closing;
  }

  // --- internals ----------------------------------------------------------------------------

  /** A write transaction, run again on deadlock or serialization failure; errors translated for callers. */
  private async tx<T>(body: (tx: Kysely<Tables>) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.db.transaction().execute(body);
      } catch (e) {
        if (attempt >= TRANSACTION_ATTEMPTS || !this.d.retryable(e)) throw this.d.toStoreError(e);
      }
    }
  }

  /**
   * Stages blobs (outside any lock), then runs `body` in a write transaction; `body` promotes
   * them before writing rows that name them. What no committed row names is cleaned up.
   */
  private async withBlobs<T>(owner: string, kinds: BlobKind[], bytes: Uint8Array[], body: (tx: Kysely<Tables>, staged: StagedBlobs) => Promise<T>): Promise<T> {
    const staged = await this.blobs.stage(owner, kinds, bytes);
    let result: T;
    try {
      result = await this.tx((tx) => body(tx, staged));
    } catch (e) {
      await staged.settle(false);
      throw e;
    }
    await staged.settle(true);
    return result;
  }

  /** Waits for a write, turning a constraint violation into the ReftError callers see. */
  private async named<T>(write: Promise<T>, as: Violations): Promise<T> {
    try {
      return await write;
    } catch (e) {
      const kind = this.d.violation(e);
      const make = kind && as[kind];
      throw make ? make() : e;
    }
  }

  /** Interventions the tenant can see: its own and the shared ones (a null tenant: shared only). */
  private visible(tenantId: string | null) {
    return this.db.selectFrom('interventions').where((eb) => eb.or([eb('tenant_id', '=', tenantId), eb('tenant_id', 'is', null)]));
  }

  /** The guard of every worker write: the worker named holds an unexpired lease. */
  private leaseHeld(jobId: string, workerId: string) {
    return (eb: ExpressionBuilder<Tables, 'jobs'>) =>
      eb.and([eb('id', '=', jobId), eb('status', '=', 'running'), eb('lease_worker', '=', workerId), eb('lease_expires_at', '>', this.d.leaseNow())]);
  }

  /** The blob column values of the row `from` finds, where they name files to release later (else none). */
  private async blobsOf(from: AnySelect, columns: string[]): Promise<unknown[]> {
    if (!this.blobs.external) return [];
    const row = await from.select(columns.map((c) => sql.ref(c).as(c))).executeTakeFirst();
    return row ? columns.map((c) => row[c]) : [];
  }

  /** Reads a row's blobs; a blob that vanished between reading the row and the file means: read the row again. */
  private async readBlobs(from: AnySelect, columns: string[], seen?: (row: Record<string, unknown>) => void): Promise<Uint8Array[] | null> {
    for (let attempt = 0; ; attempt++) {
      const row = await from.select(columns.map((c) => sql.ref(c).as(c))).executeTakeFirst();
      if (!row) return null;
      seen?.(row);
      const data = await this.blobs.read(columns.map((c) => row[c]));
      if (data) return data;
      if (attempt >= BLOB_READ_RETRIES) throw new ReftError('internal', `a stored file is missing from ${this.blobs.where}`);
    }
  }

  private async page<R extends { id: string }, T>(from: AnySelect, columns: readonly string[], req: S.PageRequest, map: (row: R) => T): Promise<S.Page<T>> {
    const limit = clampLimit(req.limit);
    const cursor = req.after === undefined ? undefined : await from.select('seq').where('id', '=', req.after).executeTakeFirst();
    const rows = await from.select(columns).where('seq', '>', seqAfter(req.after, cursor)).orderBy('seq').limit(limit + 1).execute();
    return pageOf(rows as R[], limit, map);
  }

  private async addEvent(tx: Kysely<Tables>, jobId: string, type: string, data: unknown): Promise<void> {
    await this.d.addEvent(tx, jobId, type, jsonText(data), this.d.now());
  }

  /** Ends a job regardless of its lease (queued cancel, claim-time give-up), with its status event. */
  private async endJob(tx: Kysely<Tables>, id: string, status: 'cancelled' | 'failed', error: string | null): Promise<void> {
    const end = { status, error, finished_at: this.d.now(), lease_worker: null, lease_expires_at: null };
    await tx.updateTable('jobs').set(end).where('id', '=', id).execute();
    await this.addEvent(tx, id, 'status', endedEvent(status, error));
  }
}
