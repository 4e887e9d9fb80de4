import { createHash } from 'node:crypto';
import { sql, type ExpressionBuilder, type Kysely } from 'kysely';
import {
  ReftError,
  apiKeyTaken,
  interventionNameTaken,
  interventionNotFound,
  interventionReplaceMissing,
  interventionInUse,
  compositionNameTaken,
  compositionReplaceMissing,
  jobNotFound,
  tenantNameTaken,
  tenantNotFound,
} from '../errors.ts';
import type { AnySelect, BlobKind, Dialect, StagedBlobs } from './dialect.ts';
import {
  COMPOSITION_ID,
  INTERVENTION_ID,
  blobsOf,
  clampLimit,
  countJobs,
  countStored,
  newId,
  orNull,
  pageOf,
  readBlobs,
  same,
} from './rows.ts';
import { COLUMNS, jsonText, toComposition, toEvent, toIntervention, toJob, type Tables } from './schema.ts';
import * as S from './store.ts';
import { checkUsageRange, usageBatch } from './usage.ts';
import { Listeners } from './listeners.ts';

/** The Store, once for both databases, over Kysely; what differs between them is a Dialect (dialect.ts). */

type Tx = Kysely<Tables>;
type BlobWrite<T> = (tx: Tx, staged: StagedBlobs) => Promise<T>;
type Violations = Partial<Record<'unique' | 'foreignKey', () => ReftError>>;

/** Attempts of a transaction that fails with a deadlock or serialization failure. */
const TRANSACTION_ATTEMPTS = 3;

const noTenant = (tenantId: string | null) => tenantNotFound({ id: String(tenantId) }, 'tenantId');
const nameTaken = (name: string) => ({ unique: () => tenantNameTaken({ name }, 'name') });
const noneToReplace = (id: string) => interventionReplaceMissing({ id }, 'id');

const one = (r: { numUpdatedRows?: bigint; numDeletedRows?: bigint }): boolean => (r.numUpdatedRows ?? r.numDeletedRows) === 1n;

export class SqlStore implements S.Store {
  readonly interventionListeners = new Listeners<[id: string]>();
  readonly jobListeners = new Listeners<[]>();
  private readonly db: Kysely<Tables>;
  private closing: Promise<void> | null = null;

  constructor(private readonly d: Dialect) {
    this.db = d.db;
  }

  async createTenant(name: string): Promise<S.Tenant> {
    const values = { id: newId('ten_'), name, created_at: this.d.now() };
    return this.named(this.db.insertInto('tenants').values(values).returning(COLUMNS.tenant).executeTakeFirstOrThrow(), nameTaken(name));
  }

  async renameTenant(id: string, name: string): Promise<S.Tenant | null> {
    const rename = this.db.updateTable('tenants').set({ name }).where('id', '=', id).returning(COLUMNS.tenant).executeTakeFirst();
    return orNull(await this.named(rename, nameTaken(name)), same);
  }

  async deleteTenant(id: string): Promise<boolean> {
    const { config, weights, file, checkpoint } = this.d.blobs.columns;
    let interventions: string[] = [];
    const blobs = await this.tx(async (tx) => {
      const owned = (table: 'interventions' | 'files' | 'jobs') => tx.selectFrom(table).where('tenant_id', '=', id);
      interventions = (await owned('interventions').select('id').execute()).map((r) => r.id);
      const checkpoints = tx.selectFrom('checkpoints').where('job_id', 'in', owned('jobs').select('id'));
      const blobs = [
        ...(await blobsOf(this.d.blobs, owned('interventions'), [config, weights])),
        ...(await blobsOf(this.d.blobs, owned('files'), [file])),
        ...(await blobsOf(this.d.blobs, checkpoints, [checkpoint])),
      ];
      // What it owns first (jobs take their events and checkpoints along): SQLite's foreign keys don't cascade.
      for (const table of ['api_keys', 'tenant_usage', 'jobs', 'files', 'compositions', 'interventions'] as const)
        await tx.deleteFrom(table).where('tenant_id', '=', id).execute();
      if (!one(await tx.deleteFrom('tenants').where('id', '=', id).executeTakeFirst())) return null;
      for (const iv of interventions) await this.d.notify(tx, 'interventionChanged', iv);
      return blobs;
    });
    if (!blobs) return false;
    await this.d.blobs.release(blobs);
    for (const iv of interventions) this.interventionListeners.emit(iv);
    return true;
  }

  async getTenant(id: string): Promise<S.Tenant | null> {
    return orNull(await this.db.selectFrom('tenants').select(COLUMNS.tenant).where('id', '=', id).executeTakeFirst(), same);
  }

  async listTenants(page: S.PageRequest): Promise<S.Page<S.Tenant>> {
    return pageOf<S.Tenant>(this.db.selectFrom('tenants'), COLUMNS.tenant, page, same);
  }

  async createApiKey(tenantId: string, secretHash: string, prefix?: string): Promise<S.ApiKey> {
    const values = { id: newId('key_'), tenant_id: tenantId, secret_hash: secretHash, prefix, created_at: this.d.now() };
    const insert = this.db.insertInto('api_keys').values(values).returning(COLUMNS.key).executeTakeFirstOrThrow();
    const taken = () => apiKeyTaken('secretHash');
    return this.named(insert, { foreignKey: () => noTenant(tenantId), unique: taken });
  }

  async findApiKey(secretHash: string): Promise<{ key: S.ApiKey; tenant: S.Tenant } | null> {
    const row = await this.db
      .selectFrom('api_keys as k')
      .innerJoin('tenants as t', 't.id', 'k.tenant_id')
      .select(['t.name', 't.created_at as tenant_created_at', ...COLUMNS.key.map((c) => `k.${c}` as const)])
      .where((eb) => eb.and([eb('k.secret_hash', '=', secretHash), eb('k.revoked_at', 'is', null)]))
      .executeTakeFirst();
    return orNull(row, ({ name, tenant_created_at, ...key }) => ({
      key,
      tenant: { id: key.tenantId, name, createdAt: tenant_created_at },
    }));
  }

  async listApiKeys(tenantId: string): Promise<S.ApiKey[]> {
    return this.db
      .selectFrom('api_keys')
      .select(COLUMNS.key)
      .where('tenant_id', '=', tenantId)
      .orderBy('created_at')
      .orderBy('id')
      .execute();
  }

  async touchApiKey(id: string): Promise<void> {
    await this.db.updateTable('api_keys').set({ last_used_at: this.d.now() }).where('id', '=', id).execute();
  }

  async revokeApiKey(id: string): Promise<boolean> {
    const revoke = this.db.updateTable('api_keys').set({ revoked_at: this.d.now() }).where('id', '=', id).where('revoked_at', 'is', null);
    return one(await revoke.executeTakeFirst());
  }

  async putIntervention(iv: S.NewIntervention, replaceId?: string): Promise<S.InterventionMeta> {
    // An id the store could not have made names no row, and must never reach a blob file name.
    if (replaceId !== undefined && !INTERVENTION_ID.test(replaceId)) throw noneToReplace(replaceId);
    const id = replaceId ?? newId('iv_');
    const { config, weights } = iv.files;
    const bytes = config.byteLength + weights.byteLength;
    const sha256 = createHash('sha256').update(config).update(weights).digest('hex');
    const values = { name: iv.name, description: iv.description ?? null, source: iv.source, config: jsonText(iv.config), bytes, sha256 };
    const columns = this.d.blobs.columns;
    let replaced: unknown[] = [];
    const write = this.withBlobs(id, ['config', 'weights'], [config, weights], async (tx, staged) => {
      const files = { [columns.config]: staged.values[0], [columns.weights]: staged.values[1] } as object;
      const now = this.d.now();
      if (replaceId === undefined) {
        staged.promote();
        const row = { ...values, ...files, id, tenant_id: iv.tenantId, version: 1, created_at: now, updated_at: now };
        return tx.insertInto('interventions').values(row).returning(COLUMNS.intervention).executeTakeFirstOrThrow();
      }
      const own = tx.selectFrom('interventions').where('id', '=', id).where('tenant_id', 'is not distinct from', iv.tenantId);
      if (!(await this.d.lock(own.select('id'), 'row').executeTakeFirst())) throw noneToReplace(id);
      replaced = await blobsOf(this.d.blobs, own, [columns.config, columns.weights]);
      staged.promote();
      const update = tx
        .updateTable('interventions')
        .set((eb) => ({ ...values, ...files, version: eb('version', '+', 1), updated_at: now }));
      const row = await update.where('id', '=', id).returning(COLUMNS.intervention).executeTakeFirstOrThrow();
      await this.d.notify(tx, 'interventionChanged', id);
      return row;
    });
    const taken = () => interventionNameTaken({ name: iv.name }, 'name');
    const row = await this.named(write, { unique: taken, foreignKey: () => noTenant(iv.tenantId) });
    if (replaceId !== undefined) {
      // Only now, after the commit, are the old files unreferenced.
      await this.d.blobs.release(replaced);
      this.interventionListeners.emit(id);
    }
    return toIntervention(row);
  }

  async findIntervention(tenantId: string | null, idOrName: string): Promise<S.InterventionMeta | null> {
    return orNull(
      await this.byIdOrName('interventions', tenantId, idOrName).select(COLUMNS.intervention).executeTakeFirst(),
      toIntervention,
    );
  }

  async listInterventions(tenantId: string | null, page: S.PageRequest): Promise<S.Page<S.InterventionMeta>> {
    return pageOf(this.visible('interventions', tenantId), COLUMNS.intervention, page, toIntervention);
  }

  async readInterventionFiles(id: string): Promise<S.InterventionFiles | null> {
    const { config, weights } = this.d.blobs.columns;
    const found = await readBlobs(this.d.blobs, this.db.selectFrom('interventions').where('id', '=', id), [config, weights]);
    return orNull(found, ([c, w]) => ({ config: c, weights: w }));
  }

  async deleteIntervention(tenantId: string | null, id: string): Promise<boolean> {
    const { config, weights } = this.d.blobs.columns;
    const deleted = await this.deleteWithBlobs('interventions', tenantId, id, [config, weights]);
    if (deleted) this.interventionListeners.emit(id);
    return deleted;
  }

  async putComposition(c: S.NewComposition, replaceId?: string): Promise<S.Composition> {
    if (replaceId !== undefined && !COMPOSITION_ID.test(replaceId)) throw compositionReplaceMissing({ id: replaceId }, 'id');
    const id = replaceId ?? newId('comp_');
    const uses = [...new Set(c.items.map((item) => item.intervention))];
    const write = this.tx(async (tx) => {
      // Locked as a foreign key check locks them: none can be deleted before this commits.
      const found = uses.length ? this.visible('interventions', c.tenantId, tx).select('id').where('id', 'in', uses) : undefined;
      const seen = new Set(found ? (await this.d.lock(found, 'share').execute()).map((r) => r.id) : []);
      const missing = c.items.findIndex((item) => !seen.has(item.intervention));
      if (missing >= 0) throw interventionNotFound({ id: c.items[missing].intervention }, `items[${missing}].intervention`);
      const now = this.d.now();
      const values = { name: c.name, items: jsonText(c.items), updated_at: now };
      const own = 'is not distinct from';
      const write = replaceId
        ? tx.updateTable('compositions').set(values).where('id', '=', id).where('tenant_id', own, c.tenantId).returning(COLUMNS.composition)
        : tx
            .insertInto('compositions')
            .values({ ...values, id, tenant_id: c.tenantId, created_at: now })
            .returning(COLUMNS.composition);
      const row = await write.executeTakeFirst();
      if (!row) throw compositionReplaceMissing({ id }, 'id');
      await tx.deleteFrom('composition_uses').where('composition_id', '=', id).execute();
      if (uses.length)
        await tx
          .insertInto('composition_uses')
          .values(uses.map((u) => ({ composition_id: id, intervention_id: u })))
          .execute();
      return row;
    });
    const taken = () => compositionNameTaken({ name: c.name }, 'name');
    return toComposition(await this.named(write, { unique: taken, foreignKey: () => noTenant(c.tenantId) }));
  }

  async findComposition(tenantId: string | null, idOrName: string): Promise<S.Composition | null> {
    return orNull(await this.byIdOrName('compositions', tenantId, idOrName).select(COLUMNS.composition).executeTakeFirst(), toComposition);
  }

  async listCompositions(tenantId: string | null, page: S.PageRequest): Promise<S.Page<S.Composition>> {
    return pageOf(this.visible('compositions', tenantId), COLUMNS.composition, page, toComposition);
  }

  async deleteComposition(tenantId: string | null, id: string): Promise<boolean> {
    return one(
      await this.db.deleteFrom('compositions').where('id', '=', id).where('tenant_id', 'is not distinct from', tenantId).executeTakeFirst(),
    );
  }

  async storedUsage(tenantId: string): Promise<S.StoredUsage> {
    return countStored(this.db, tenantId);
  }

  async recordUsage(entries: S.UsageRecord[]): Promise<void> {
    const rows = usageBatch(entries);
    if (rows.length > 0) await this.retried(() => this.d.addUsage(this.db, rows));
  }

  async getUsage(tenantId: string, from: string, to: string): Promise<S.UsageDay[]> {
    checkUsageRange(from, to);
    return this.db
      .selectFrom('tenant_usage')
      .select(COLUMNS.usageDay)
      .where((eb) => eb.and([eb('tenant_id', '=', tenantId), eb('day', '>=', from), eb('day', '<=', to)]))
      .orderBy('day')
      .execute();
  }

  async putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<S.StoredFile> {
    const id = newId('file_');
    const write = this.withBlobs(id, ['data'], [bytes], (tx, staged) => {
      staged.promote();
      const row = { id, tenant_id: tenantId, filename, purpose, bytes: bytes.byteLength, created_at: this.d.now() };
      return tx
        .insertInto('files')
        .values({ ...row, [this.d.blobs.columns.file]: staged.values[0] })
        .returning(COLUMNS.file)
        .executeTakeFirstOrThrow();
    });
    return this.named(write, { foreignKey: () => noTenant(tenantId) });
  }

  async getFile(tenantId: string, id: string): Promise<S.StoredFile | null> {
    return orNull(await this.file(tenantId, id).select(COLUMNS.file).executeTakeFirst(), same);
  }

  async readFile(tenantId: string, id: string): Promise<Uint8Array | null> {
    return orNull(await readBlobs(this.d.blobs, this.file(tenantId, id), [this.d.blobs.columns.file]), ([data]) => data);
  }

  async listFiles(tenantId: string, page: S.PageRequest): Promise<S.Page<S.StoredFile>> {
    return pageOf(this.db.selectFrom('files').where('tenant_id', '=', tenantId), COLUMNS.file, page, same<S.StoredFile>);
  }

  async deleteFile(tenantId: string, id: string): Promise<boolean> {
    return this.deleteWithBlobs('files', tenantId, id, [this.d.blobs.columns.file]);
  }

  async createJob(tenantId: string, spec: unknown): Promise<S.Job> {
    const id = newId('job_');
    const values = { id, tenant_id: tenantId, status: 'queued' as const, spec: jsonText(spec), progress: 'null', created_at: this.d.now() };
    const write = this.tx(async (tx) => {
      const row = await tx.insertInto('jobs').values(values).returning(COLUMNS.job).executeTakeFirstOrThrow();
      await this.addEvent(tx, id, 'status', { status: 'queued' });
      await this.d.notify(tx, 'jobQueued', id);
      return row;
    });
    const row = await this.named(write, { foreignKey: () => noTenant(tenantId) });
    this.jobListeners.emit();
    return toJob(row);
  }

  async getJob(tenantId: string | null, id: string): Promise<S.Job | null> {
    const job = this.db.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id);
    return orNull(await (tenantId === null ? job : job.where('tenant_id', '=', tenantId)).executeTakeFirst(), toJob);
  }

  async listJobs(tenantId: string, page: S.PageRequest): Promise<S.Page<S.Job>> {
    return pageOf(this.db.selectFrom('jobs').where('tenant_id', '=', tenantId), COLUMNS.job, page, toJob, page.order === 'desc');
  }

  async requestCancel(tenantId: string, id: string): Promise<S.Job | null> {
    return this.tx(async (tx) => {
      // Locked: a claimer skips the row until we commit, so a queued job can't start meanwhile.
      const job = tx.selectFrom('jobs').select('status').where('id', '=', id).where('tenant_id', '=', tenantId);
      const row = await this.d.lock(job, 'row').executeTakeFirst();
      if (!row) return null;
      // A running job's worker sees cancelRequested when it next reads the job, and finishes it as cancelled.
      if (row.status === 'queued' || row.status === 'running') {
        await tx
          .updateTable('jobs')
          .set({ cancel_requested: sql.lit(true) })
          .where('id', '=', id)
          .execute();
      }
      if (row.status === 'queued') await this.endJob(tx, id, { status: 'cancelled' });
      return toJob(await tx.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id).executeTakeFirstOrThrow());
    });
  }

  async claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: S.Job; lease: S.Lease } | null> {
    // Read and taken in one write transaction, the row locked (SQLite: the database), so two
    // workers in any processes never take the same job.
    return this.tx(async (tx) => {
      for (;;) {
        const next = tx
          .selectFrom('jobs')
          .select(COLUMNS.job)
          .where('status', 'in', ['queued', 'running'])
          .where((eb) => eb.or([eb('status', '=', 'queued'), eb('lease_expires_at', '<=', this.d.leaseAt(0))]))
          // Fair between tenants: the tenant served longest ago (or never) first, then the oldest job.
          .orderBy(sql`(SELECT max(served.started_at) FROM jobs AS served WHERE served.tenant_id = jobs.tenant_id) ASC NULLS FIRST`)
          .orderBy('seq')
          .limit(1);
        const row = await this.d.lock(next, 'skip').executeTakeFirst();
        if (!row) return null;
        // A cancel requested before its worker died wins over a retry.
        if (row.cancelRequested) {
          await this.endJob(tx, row.id, { status: 'cancelled' });
          continue;
        }
        if (row.attempts >= maxAttempts) {
          const error = `gave up after ${row.attempts} attempt(s): the worker stopped renewing its lease`;
          await this.endJob(tx, row.id, { status: 'failed', error });
          continue;
        }
        const claim = tx.updateTable('jobs').set((eb) => ({
          status: 'running',
          attempts: eb('attempts', '+', 1),
          started_at: eb.fn.coalesce('started_at', sql<string>`${this.d.now()}`),
          lease_worker: workerId,
          lease_expires_at: this.d.leaseAt(leaseMs),
        }));
        const { expiresAt, ...claimed } = await claim
          .where('id', '=', row.id)
          .returning([...COLUMNS.job, 'lease_expires_at as expiresAt'])
          .executeTakeFirstOrThrow();
        await this.addEvent(tx, row.id, 'status', { status: 'running', attempt: claimed.attempts });
        return { job: toJob(claimed), lease: { jobId: row.id, workerId, expiresAt: new Date(expiresAt!).getTime() } };
      }
    });
  }

  async renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean> {
    const renew = this.db
      .updateTable('jobs')
      .set({ lease_expires_at: this.d.leaseAt(leaseMs) })
      .where(this.leaseHeld(jobId, workerId));
    return one(await renew.executeTakeFirst());
  }

  async updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean> {
    const update = this.db
      .updateTable('jobs')
      .set({ progress: jsonText(progress) })
      .where(this.leaseHeld(jobId, workerId));
    return one(await update.executeTakeFirst());
  }

  async appendJobEvent(jobId: string, type: string, data: unknown): Promise<S.JobEvent> {
    const row = await this.tx((tx) => this.addEvent(tx, jobId, type, data));
    if (!row) throw jobNotFound({ id: jobId }, 'jobId');
    return toEvent(row);
  }

  async listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<S.JobEvent[]> {
    const events = this.db.selectFrom('job_events').select(COLUMNS.event).where('job_id', '=', jobId).where('seq', '>', afterSeq);
    return (await events.orderBy('seq').limit(clampLimit(limit)).execute()).map(toEvent);
  }

  async saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean> {
    const column = this.d.blobs.columns.checkpoint;
    let replaced: unknown[] = [];
    const saved = await this.withBlobs(jobId, ['ckpt'], [state], async (tx, staged) => {
      // Locked: the lease can't expire into another worker's hands before the commit.
      const held = tx.selectFrom('jobs').select('id').where(this.leaseHeld(jobId, workerId));
      if (!(await this.d.lock(held, 'row').executeTakeFirst())) return false;
      replaced = await blobsOf(this.d.blobs, tx.selectFrom('checkpoints').where('job_id', '=', jobId), [column]);
      staged.promote();
      const row = { job_id: jobId, step, bytes: state.byteLength, created_at: this.d.now(), [column]: staged.values[0] };
      const excluded = Object.fromEntries(['step', 'bytes', 'created_at', column].map((c) => [c, sql.ref(`excluded.${c}`)]));
      await tx
        .insertInto('checkpoints')
        .values(row)
        .onConflict((oc) => oc.column('job_id').doUpdateSet(excluded))
        .execute();
      return true;
    });
    await this.d.blobs.release(replaced);
    return saved;
  }

  async loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null> {
    let step = 0;
    const row = this.db.selectFrom('checkpoints').where('job_id', '=', jobId).select('step');
    const found = await readBlobs(this.d.blobs, row, [this.d.blobs.columns.checkpoint], (r) => (step = r.step as number));
    return orNull(found, ([state]) => ({ step, state }));
  }

  async finishJob(jobId: string, workerId: string, outcome: S.JobOutcome): Promise<boolean> {
    const error = outcome.status === 'failed' ? outcome.error : null;
    const interventionId = outcome.status === 'succeeded' ? outcome.interventionId : null;
    const write = this.tx((tx) => this.endJob(tx, jobId, { status: outcome.status, error, interventionId }, workerId));
    return this.named(write, { foreignKey: () => interventionNotFound({ id: String(interventionId) }, 'interventionId') });
  }

  async countJobs(): Promise<Record<S.JobStatus, number>> {
    return countJobs(this.db);
  }

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

  /** A write transaction, run again on deadlock or serialization failure; errors translated for callers. */
  private async tx<T>(body: (tx: Tx) => Promise<T>): Promise<T> {
    return this.retried(() => this.db.transaction().execute(body));
  }

  private async retried<T>(write: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await write();
      } catch (e) {
        if (attempt >= TRANSACTION_ATTEMPTS || !this.d.retryable(e)) throw this.d.toStoreError(e);
      }
    }
  }

  /** Stages blobs (outside any lock), then runs `body` in a write transaction; what no committed row names is cleaned up. */
  private async withBlobs<T>(owner: string, kinds: BlobKind[], bytes: Uint8Array[], body: BlobWrite<T>): Promise<T> {
    const staged = await this.d.blobs.stage(owner, kinds, bytes);
    const result = await this.tx((tx) => body(tx, staged)).catch(async (e) => {
      await staged.settle(false);
      throw e;
    });
    await staged.settle(true);
    return result;
  }

  /** Deletes a row (the tenant's own), then, once committed, the files it named (a crash in between leaves orphans for the sweep). */
  private async deleteWithBlobs(table: 'interventions' | 'files', tenantId: string | null, id: string, columns: string[]) {
    const files = await this.tx(async (tx) => {
      const own = 'is not distinct from';
      const row = tx.selectFrom(table).where('id', '=', id).where('tenant_id', own, tenantId);
      if (table === 'interventions') await this.refuseInUse(tx, row);
      const files = await blobsOf(this.d.blobs, row, columns);
      if (!one(await tx.deleteFrom(table).where('id', '=', id).where('tenant_id', own, tenantId).executeTakeFirst())) return null;
      if (table === 'interventions') await this.d.notify(tx, 'interventionChanged', id);
      return files;
    });
    if (files) await this.d.blobs.release(files);
    return files !== null;
  }

  /** Waits for a write, turning a constraint violation into the ReftError callers see. */
  private async named<T>(write: Promise<T>, as: Violations): Promise<T> {
    return write.catch((e) => Promise.reject(as[this.d.violation(e)!]?.() ?? e));
  }

  /** Interventions or compositions the tenant can see: its own and the shared ones (a null tenant: shared only). */
  private visible(table: 'interventions' | 'compositions', tenantId: string | null, db: Tx = this.db) {
    return db.selectFrom(table).where((eb) => eb.or([eb('tenant_id', '=', tenantId), eb('tenant_id', 'is', null)]));
  }

  /** The one a tenant means by `idOrName`: an id match first, then the tenant's own name, then a shared name. */
  private byIdOrName(table: 'interventions' | 'compositions', tenantId: string | null, idOrName: string) {
    const match = this.visible(table, tenantId).where((eb) => eb.or([eb('id', '=', idOrName), eb('name', '=', idOrName)]));
    return match.orderBy(sql`id = ${idOrName} DESC, tenant_id IS NULL`).limit(1);
  }

  /**
   * Refuses to delete an intervention a composition uses, naming them. The row is locked as a delete
   * locks it, so a putComposition that read it first has committed; one that comes later waits, then finds it gone.
   */
  private async refuseInUse(tx: Tx, row: AnySelect): Promise<void> {
    const id = (await this.d.lock(row.select('id'), 'delete').executeTakeFirst())?.id as string | undefined;
    if (id === undefined) return;
    const users = await tx
      .selectFrom('composition_uses as u')
      .innerJoin('compositions as c', 'c.id', 'u.composition_id')
      .select('c.name')
      .where('u.intervention_id', '=', id)
      .orderBy('c.seq')
      .execute();
    if (users.length) throw interventionInUse({ id, compositions: users.map((u) => u.name) }, 'id');
  }

  private file(tenantId: string, id: string) {
    return this.db.selectFrom('files').where('id', '=', id).where('tenant_id', '=', tenantId);
  }

  /** The guard of every worker write: the worker named holds an unexpired lease. */
  private leaseHeld(jobId: string, workerId: string) {
    const live = this.d.leaseAt(0);
    return (eb: ExpressionBuilder<Tables, 'jobs'>) =>
      eb.and([eb('id', '=', jobId), eb('status', '=', 'running'), eb('lease_worker', '=', workerId), eb('lease_expires_at', '>', live)]);
  }

  /** Appends an event with the job's next number (the job's row locked, so concurrent appends never collide); undefined when there is no such job. */
  private async addEvent(tx: Tx, jobId: string, type: string, data: unknown) {
    if (!(await this.d.lock(tx.selectFrom('jobs').select('id').where('id', '=', jobId), 'row').executeTakeFirst())) return undefined;
    const seq = sql<number>`(SELECT coalesce(max(seq), 0) + 1 FROM job_events WHERE job_id = ${jobId})`;
    const row = { job_id: jobId, seq, created_at: this.d.now(), type, data: jsonText(data) };
    return tx.insertInto('job_events').values(row).returning(COLUMNS.event).executeTakeFirstOrThrow();
  }

  /**
   * Ends a job with its 'status' event: one `workerId` holds (finishJob), or whatever its lease
   * (a queued cancel, a claim's give-up). False when the worker no longer holds it.
   */
  private async endJob(
    tx: Tx,
    id: string,
    end: { status: S.JobStatus; error?: string | null; interventionId?: string | null },
    workerId?: string,
  ) {
    const { status, error = null, interventionId = null } = end;
    const set = { status, error, intervention_id: interventionId, finished_at: this.d.now(), lease_worker: null, lease_expires_at: null };
    const held = workerId === undefined ? (eb: ExpressionBuilder<Tables, 'jobs'>) => eb('id', '=', id) : this.leaseHeld(id, workerId);
    if (!one(await tx.updateTable('jobs').set(set).where(held).executeTakeFirst())) return false;
    await this.addEvent(tx, id, 'status', {
      status,
      ...(error !== null && { error }),
      ...(interventionId !== null && { intervention_id: interventionId }),
    });
    return true;
  }
}
