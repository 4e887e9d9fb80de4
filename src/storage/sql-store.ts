import { createHash } from 'node:crypto';
import { sql, type Kysely } from 'kysely';
import * as E from '../errors.ts';
import type { AnySelect, BlobKind, Dialect, StagedBlobs } from './dialect.ts';
import * as R from './rows.ts';
import { COLUMNS, jsonText, toComposition, toEvent, toIntervention, toJob, type Tables } from './schema.ts';
import * as S from './store.ts';
import { checkUsageRange, usageBatch } from './usage.ts';
import { Listeners } from './listeners.ts';
import { JobQueue } from './job-queue.ts';

/** The Store, once for both databases, over Kysely; what differs between them is a Dialect (dialect.ts). */

type Tx = Kysely<Tables>;
type Violations = Partial<Record<'unique' | 'foreignKey', () => E.ReftError>>;
/** Tables of rows a tenant owns (null: shared ones, for interventions and compositions). */
type Owned = 'interventions' | 'compositions' | 'files' | 'jobs';

/** Attempts of a transaction that fails with a deadlock or serialization failure. */
const TRANSACTION_ATTEMPTS = 3;

const noTenant = (tenantId: string | null) => E.tenantNotFound({ id: String(tenantId) }, 'tenantId');
const nameTaken = (name: string) => ({ unique: () => E.tenantNameTaken({ name }, 'name') });

export class SqlStore implements S.Store {
  readonly interventionListeners = new Listeners<[id: string]>();
  readonly jobListeners = new Listeners<[]>();
  private readonly db: Kysely<Tables>;
  private readonly jobs: JobQueue;
  private closing: Promise<void> | null = null;

  constructor(private readonly d: Dialect) {
    this.db = d.db;
    this.jobs = new JobQueue(d);
  }

  async createTenant(name: string): Promise<S.Tenant> {
    const insert = this.db.insertInto('tenants').values({ id: R.newId('ten_'), name, createdAt: this.d.now() });
    return this.named(insert.returning(COLUMNS.tenant).executeTakeFirstOrThrow(), nameTaken(name));
  }

  async renameTenant(id: string, name: string): Promise<S.Tenant | null> {
    const rename = this.db.updateTable('tenants').set({ name }).where('id', '=', id).returning(COLUMNS.tenant);
    return (await this.named(rename.executeTakeFirst(), nameTaken(name))) ?? null;
  }

  async deleteTenant(id: string): Promise<boolean> {
    const { config, weights, file, checkpoint } = this.d.blobs.columns;
    let interventions: string[] = [];
    const blobs = await this.tx(async (tx) => {
      const owned = (table: Owned) => tx.selectFrom(table).where('tenantId', '=', id);
      interventions = (await owned('interventions').select('id').execute()).map((r) => r.id);
      const checkpoints = tx.selectFrom('checkpoints').where('jobId', 'in', owned('jobs').select('id'));
      const blobs = [
        ...(await R.blobsOf(this.d.blobs, owned('interventions'), [config, weights])),
        ...(await R.blobsOf(this.d.blobs, owned('files'), [file])),
        ...(await R.blobsOf(this.d.blobs, checkpoints, [checkpoint])),
      ];
      // What it owns first (jobs take their events and checkpoints along, compositions their uses): SQLite's foreign keys don't cascade.
      for (const table of ['apiKeys', 'tenantUsage', 'jobs', 'files', 'compositions', 'interventions'] as const)
        await tx.deleteFrom(table).where('tenantId', '=', id).execute();
      if (!R.one(await tx.deleteFrom('tenants').where('id', '=', id).executeTakeFirst())) return null;
      for (const iv of interventions) await this.d.notify(tx, 'interventionChanged', iv);
      return blobs;
    });
    if (!blobs) return false;
    await this.d.blobs.release(blobs);
    for (const iv of interventions) this.interventionListeners.emit(iv);
    return true;
  }

  async getTenant(id: string): Promise<S.Tenant | null> {
    return (await this.db.selectFrom('tenants').select(COLUMNS.tenant).where('id', '=', id).executeTakeFirst()) ?? null;
  }

  async listTenants(page: S.PageRequest): Promise<S.Page<S.Tenant>> {
    return R.pageOf(this.db.selectFrom('tenants'), COLUMNS.tenant, page, (r: S.Tenant) => r);
  }

  async createApiKey(tenantId: string, secretHash: string, prefix?: string): Promise<S.ApiKey> {
    const insert = this.db.insertInto('apiKeys').values({ id: R.newId('key_'), tenantId, secretHash, prefix, createdAt: this.d.now() });
    const taken = () => E.apiKeyTaken('secretHash');
    return this.named(insert.returning(COLUMNS.key).executeTakeFirstOrThrow(), { foreignKey: () => noTenant(tenantId), unique: taken });
  }

  async findApiKey(secretHash: string): Promise<{ key: S.ApiKey; tenant: S.Tenant } | null> {
    const keys = this.db.selectFrom('apiKeys as k').innerJoin('tenants as t', 't.id', 'k.tenantId');
    const columns = ['t.name', 't.createdAt as tenantCreatedAt', ...COLUMNS.key.map((c) => `k.${c}` as const)] as const;
    const row = await keys.select(columns).where('k.secretHash', '=', secretHash).where('k.revokedAt', 'is', null).executeTakeFirst();
    return R.orNull(row, ({ name, tenantCreatedAt, ...key }) => ({ key, tenant: { id: key.tenantId, name, createdAt: tenantCreatedAt } }));
  }

  async listApiKeys(tenantId: string): Promise<S.ApiKey[]> {
    const keys = this.db.selectFrom('apiKeys').select(COLUMNS.key).where('tenantId', '=', tenantId);
    return keys.orderBy('createdAt').orderBy('id').execute();
  }

  async touchApiKey(id: string): Promise<void> {
    await this.db.updateTable('apiKeys').set({ lastUsedAt: this.d.now() }).where('id', '=', id).execute();
  }

  async revokeApiKey(id: string): Promise<boolean> {
    const revoke = this.db.updateTable('apiKeys').set({ revokedAt: this.d.now() }).where('id', '=', id).where('revokedAt', 'is', null);
    return R.one(await revoke.executeTakeFirst());
  }

  async putIntervention(iv: S.NewIntervention, replaceId?: string): Promise<S.InterventionMeta> {
    const noneToReplace = () => E.interventionReplaceMissing({ id: String(replaceId) }, 'id');
    // An id the store could not have made names no row, and must never reach a blob file name.
    if (replaceId !== undefined && !R.INTERVENTION_ID.test(replaceId)) throw noneToReplace();
    const id = replaceId ?? R.newId('iv_');
    const { config, weights } = iv.files;
    const sha256 = createHash('sha256').update(config).update(weights).digest('hex');
    const bytes = config.byteLength + weights.byteLength;
    const values = { name: iv.name, description: iv.description ?? null, source: iv.source, config: jsonText(iv.config), bytes, sha256 };
    const columns = this.d.blobs.columns;
    let replaced: unknown[] = [];
    const write = this.withBlobs(id, ['config', 'weights'], [config, weights], async (tx, staged) => {
      const files = { [columns.config]: staged.values[0], [columns.weights]: staged.values[1] } as object;
      const now = this.d.now();
      if (replaceId === undefined) {
        staged.promote();
        const row = { ...values, ...files, id, tenantId: iv.tenantId, version: 1, createdAt: now, updatedAt: now };
        return tx.insertInto('interventions').values(row).returning(COLUMNS.intervention).executeTakeFirstOrThrow();
      }
      const own = this.own(tx, 'interventions', iv.tenantId, id);
      if (!(await this.d.lock(own.select('id'), 'row').executeTakeFirst())) throw noneToReplace();
      replaced = await R.blobsOf(this.d.blobs, own, [columns.config, columns.weights]);
      staged.promote();
      const update = tx.updateTable('interventions').set((eb) => ({ ...values, ...files, version: eb('version', '+', 1), updatedAt: now }));
      const row = await update.where('id', '=', id).returning(COLUMNS.intervention).executeTakeFirstOrThrow();
      await this.d.notify(tx, 'interventionChanged', id);
      return row;
    });
    const taken = () => E.interventionNameTaken({ name: iv.name }, 'name');
    const row = await this.named(write, { unique: taken, foreignKey: () => noTenant(iv.tenantId) });
    if (replaceId !== undefined) {
      // Only now, after the commit, are the old files unreferenced.
      await this.d.blobs.release(replaced);
      this.interventionListeners.emit(id);
    }
    return toIntervention(row);
  }

  async findIntervention(tenantId: string | null, idOrName: string): Promise<S.InterventionMeta | null> {
    const found = this.byIdOrName('interventions', tenantId, idOrName).select(COLUMNS.intervention);
    return R.orNull(await found.executeTakeFirst(), toIntervention);
  }

  async listInterventions(tenantId: string | null, page: S.PageRequest): Promise<S.Page<S.InterventionMeta>> {
    return R.pageOf(this.visible('interventions', tenantId), COLUMNS.intervention, page, toIntervention);
  }

  async readInterventionFiles(id: string): Promise<S.InterventionFiles | null> {
    const { config, weights } = this.d.blobs.columns;
    const found = await R.readBlobs(this.d.blobs, this.db.selectFrom('interventions').where('id', '=', id), [config, weights]);
    return R.orNull(found, ({ data: [c, w] }) => ({ config: c, weights: w }));
  }

  async deleteIntervention(tenantId: string | null, id: string): Promise<boolean> {
    const { config, weights } = this.d.blobs.columns;
    const deleted = await this.deleteWithBlobs('interventions', tenantId, id, [config, weights]);
    if (deleted) this.interventionListeners.emit(id);
    return deleted;
  }

  async storedUsage(tenantId: string): Promise<S.StoredUsage> {
    return R.countStored(this.db, tenantId);
  }

  async putComposition(c: S.NewComposition, replaceId?: string): Promise<S.Composition> {
    const noneToReplace = () => E.compositionReplaceMissing({ id: String(replaceId) }, 'id');
    if (replaceId !== undefined && !R.COMPOSITION_ID.test(replaceId)) throw noneToReplace();
    const id = replaceId ?? R.newId('comp_');
    const uses = [...new Set(c.items.map((item) => item.intervention))];
    const write = this.tx(async (tx) => {
      // Locked as a foreign key check locks them: none can be deleted before this commits.
      const visible = this.visible('interventions', c.tenantId, tx).select('id').where('id', 'in', uses);
      const found = uses.length ? await this.d.lock(visible, 'share').execute() : [];
      const missing = c.items.findIndex((item) => !found.some((r) => r.id === item.intervention));
      if (missing >= 0) throw E.interventionNotFound({ id: c.items[missing].intervention }, `items[${missing}].intervention`);
      const now = this.d.now();
      const values = { name: c.name, items: jsonText(c.items), updatedAt: now };
      const update = tx.updateTable('compositions').set(values).where('id', '=', id).where('tenantId', 'is not distinct from', c.tenantId);
      const insert = tx.insertInto('compositions').values({ ...values, id, tenantId: c.tenantId, createdAt: now });
      const written = replaceId === undefined ? insert.returning(COLUMNS.composition) : update.returning(COLUMNS.composition);
      const row = await written.executeTakeFirst();
      if (!row) throw noneToReplace();
      await tx.deleteFrom('compositionUses').where('compositionId', '=', id).execute();
      const used = uses.map((interventionId) => ({ compositionId: id, interventionId }));
      if (used.length) await tx.insertInto('compositionUses').values(used).execute();
      return row;
    });
    const taken = () => E.compositionNameTaken({ name: c.name }, 'name');
    return toComposition(await this.named(write, { unique: taken, foreignKey: () => noTenant(c.tenantId) }));
  }

  async findComposition(tenantId: string | null, idOrName: string): Promise<S.Composition | null> {
    return R.orNull(
      await this.byIdOrName('compositions', tenantId, idOrName).select(COLUMNS.composition).executeTakeFirst(),
      toComposition,
    );
  }

  async listCompositions(tenantId: string | null, page: S.PageRequest): Promise<S.Page<S.Composition>> {
    return R.pageOf(this.visible('compositions', tenantId), COLUMNS.composition, page, toComposition);
  }

  async deleteComposition(tenantId: string | null, id: string): Promise<boolean> {
    const own = this.db.deleteFrom('compositions').where('id', '=', id);
    return R.one(await own.where('tenantId', 'is not distinct from', tenantId).executeTakeFirst());
  }

  async recordUsage(entries: S.UsageRecord[]): Promise<void> {
    const rows = usageBatch(entries);
    if (rows.length > 0) await this.retried(() => this.d.addUsage(this.db, rows));
  }

  async getUsage(tenantId: string, from: string, to: string): Promise<S.UsageDay[]> {
    checkUsageRange(from, to);
    const days = this.db.selectFrom('tenantUsage').select(COLUMNS.usageDay).where('tenantId', '=', tenantId);
    return days.where('day', '>=', from).where('day', '<=', to).orderBy('day').execute();
  }

  async putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<S.StoredFile> {
    const id = R.newId('file_');
    const write = this.withBlobs(id, ['data'], [bytes], (tx, staged) => {
      staged.promote();
      const row = {
        id,
        tenantId,
        filename,
        purpose,
        bytes: bytes.byteLength,
        createdAt: this.d.now(),
        [this.d.blobs.columns.file]: staged.values[0],
      };
      return tx.insertInto('files').values(row).returning(COLUMNS.file).executeTakeFirstOrThrow();
    });
    return this.named(write, { foreignKey: () => noTenant(tenantId) });
  }

  async getFile(tenantId: string, id: string): Promise<S.StoredFile | null> {
    return (await this.file(tenantId, id).select(COLUMNS.file).executeTakeFirst()) ?? null;
  }

  async readFile(tenantId: string, id: string): Promise<Uint8Array | null> {
    const found = await R.readBlobs(this.d.blobs, this.file(tenantId, id), [this.d.blobs.columns.file]);
    return R.orNull(found, ({ data: [data] }) => data);
  }

  async listFiles(tenantId: string, page: S.PageRequest): Promise<S.Page<S.StoredFile>> {
    return R.pageOf(this.db.selectFrom('files').where('tenantId', '=', tenantId), COLUMNS.file, page, (r: S.StoredFile) => r);
  }

  async deleteFile(tenantId: string, id: string): Promise<boolean> {
    return this.deleteWithBlobs('files', tenantId, id, [this.d.blobs.columns.file]);
  }

  async createJob(tenantId: string, spec: unknown): Promise<S.Job> {
    const id = R.newId('job_');
    const write = this.tx(async (tx) => {
      const values = { id, tenantId, status: 'queued' as const, spec: jsonText(spec), progress: 'null', createdAt: this.d.now() };
      const row = await tx.insertInto('jobs').values(values).returning(COLUMNS.job).executeTakeFirstOrThrow();
      await this.jobs.addEvent(tx, id, 'status', { status: 'queued' });
      await this.d.notify(tx, 'jobQueued', id);
      return row;
    });
    const row = await this.named(write, { foreignKey: () => noTenant(tenantId) });
    this.jobListeners.emit();
    return toJob(row);
  }

  async getJob(tenantId: string | null, id: string): Promise<S.Job | null> {
    const job = this.db.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id);
    return R.orNull(await (tenantId === null ? job : job.where('tenantId', '=', tenantId)).executeTakeFirst(), toJob);
  }

  async listJobs(tenantId: string, page: S.PageRequest): Promise<S.Page<S.Job>> {
    return R.pageOf(this.db.selectFrom('jobs').where('tenantId', '=', tenantId), COLUMNS.job, page, toJob, page.order === 'desc');
  }

  async requestCancel(tenantId: string, id: string): Promise<S.Job | null> {
    return this.tx(async (tx) => {
      // Locked: a claimer skips the row until we commit, so a queued job can't start meanwhile.
      const row = await this.d.lock(this.own(tx, 'jobs', tenantId, id).select('status'), 'row').executeTakeFirst();
      if (!row) return null;
      // A running job's worker sees cancelRequested when it next reads the job, and finishes it as cancelled.
      const flag = tx.updateTable('jobs').set({ cancelRequested: sql.lit(true) });
      if (row.status === 'queued' || row.status === 'running') await flag.where('id', '=', id).execute();
      if (row.status === 'queued') await this.jobs.end(tx, id, { status: 'cancelled' });
      return toJob(await tx.selectFrom('jobs').select(COLUMNS.job).where('id', '=', id).executeTakeFirstOrThrow());
    });
  }

  async claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: S.Job; lease: S.Lease } | null> {
    return this.tx((tx) => this.jobs.claim(tx, workerId, leaseMs, maxAttempts));
  }

  async renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean> {
    const renew = this.db.updateTable('jobs').set({ leaseExpiresAt: this.d.leaseAt(leaseMs) });
    return R.one(await renew.where(this.jobs.leaseHeld(jobId, workerId)).executeTakeFirst());
  }

  async updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean> {
    const update = this.db.updateTable('jobs').set({ progress: jsonText(progress) });
    return R.one(await update.where(this.jobs.leaseHeld(jobId, workerId)).executeTakeFirst());
  }

  async appendJobEvent(jobId: string, type: string, data: unknown): Promise<S.JobEvent> {
    const row = await this.tx((tx) => this.jobs.addEvent(tx, jobId, type, data));
    if (!row) throw E.jobNotFound({ id: jobId }, 'jobId');
    return toEvent(row);
  }

  async listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<S.JobEvent[]> {
    const events = this.db.selectFrom('jobEvents').select(COLUMNS.event).where('jobId', '=', jobId).where('seq', '>', afterSeq);
    return (await events.orderBy('seq').limit(R.clampLimit(limit)).execute()).map(toEvent);
  }

  async saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean> {
    const column = this.d.blobs.columns.checkpoint;
    let replaced: unknown[] = [];
    const saved = await this.withBlobs(jobId, ['ckpt'], [state], async (tx, staged) => {
      // Locked: the lease can't expire into another worker's hands before the commit.
      if (!(await this.d.lock(tx.selectFrom('jobs').select('id').where(this.jobs.leaseHeld(jobId, workerId)), 'row').executeTakeFirst()))
        return false;
      replaced = await R.blobsOf(this.d.blobs, tx.selectFrom('checkpoints').where('jobId', '=', jobId), [column]);
      staged.promote();
      const row = { jobId, step, bytes: state.byteLength, createdAt: this.d.now(), [column]: staged.values[0] };
      const excluded = Object.fromEntries(['step', 'bytes', 'createdAt', column].map((c) => [c, sql.ref(`excluded.${c}`)]));
      const upsert = tx.insertInto('checkpoints').values(row);
      await upsert.onConflict((oc) => oc.column('jobId').doUpdateSet(excluded)).execute();
      return true;
    });
    await this.d.blobs.release(replaced);
    return saved;
  }

  async loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null> {
    const checkpoint = this.db.selectFrom('checkpoints').where('jobId', '=', jobId).select('step');
    const found = await R.readBlobs(this.d.blobs, checkpoint, [this.d.blobs.columns.checkpoint]);
    return R.orNull(found, ({ row, data: [state] }) => ({ step: row.step as number, state }));
  }

  async finishJob(jobId: string, workerId: string, outcome: S.JobOutcome): Promise<boolean> {
    const error = outcome.status === 'failed' ? outcome.error : null;
    const interventionId = outcome.status === 'succeeded' ? outcome.interventionId : null;
    const write = this.tx((tx) => this.jobs.end(tx, jobId, { status: outcome.status, error, interventionId }, workerId));
    return this.named(write, { foreignKey: () => E.interventionNotFound({ id: String(interventionId) }, 'interventionId') });
  }

  async countJobs(): Promise<Record<S.JobStatus, number>> {
    return R.countJobs(this.db);
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
  private async withBlobs<T>(owner: string, kinds: BlobKind[], bytes: Uint8Array[], body: (tx: Tx, staged: StagedBlobs) => Promise<T>) {
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
      const row = this.own(tx, table, tenantId, id);
      if (table === 'interventions') await this.refuseInUse(tx, row);
      const files = await R.blobsOf(this.d.blobs, row, columns);
      if (!R.one(await tx.deleteFrom(table).where('id', '=', id).where('tenantId', 'is not distinct from', tenantId).executeTakeFirst()))
        return null;
      if (table === 'interventions') await this.d.notify(tx, 'interventionChanged', id);
      return files;
    });
    if (files) await this.d.blobs.release(files);
    return files !== null;
  }

  /**
   * Refuses to delete an intervention a composition uses, naming them. The row is locked as a delete
   * locks it: a putComposition that read it first has committed, one that comes later waits, then finds it gone.
   */
  private async refuseInUse(tx: Tx, row: AnySelect): Promise<void> {
    const id = (await this.d.lock(row.select('id'), 'delete').executeTakeFirst())?.id as string | undefined;
    if (id === undefined) return;
    const users = tx.selectFrom('compositionUses as u').innerJoin('compositions as c', 'c.id', 'u.compositionId').select('c.name');
    const names = (await users.where('u.interventionId', '=', id).orderBy('c.seq').execute()).map((u) => u.name);
    if (names.length) throw E.interventionInUse({ id, compositions: names }, 'id');
  }

  /** Waits for a write, turning a constraint violation into the ReftError callers see. */
  private async named<T>(write: Promise<T>, as: Violations): Promise<T> {
    return write.catch((e) => Promise.reject(as[this.d.violation(e)!]?.() ?? e));
  }

  /** The row `id` of a table if `tenantId` owns it (null: a shared one). */
  private own(db: Tx, table: Owned, tenantId: string | null, id: string) {
    return db.selectFrom(table).where('id', '=', id).where('tenantId', 'is not distinct from', tenantId);
  }

  private file(tenantId: string, id: string) {
    return this.db.selectFrom('files').where('id', '=', id).where('tenantId', '=', tenantId);
  }

  /** Interventions or compositions the tenant can see: its own and the shared ones (a null tenant: shared only). */
  private visible(table: 'interventions' | 'compositions', tenantId: string | null, db: Tx = this.db) {
    return db.selectFrom(table).where((eb) => eb.or([eb('tenantId', '=', tenantId), eb('tenantId', 'is', null)]));
  }

  /** The one a tenant means by `idOrName`: an id match first, then the tenant's own name, then a shared name. */
  private byIdOrName(table: 'interventions' | 'compositions', tenantId: string | null, idOrName: string) {
    const match = this.visible(table, tenantId).where((eb) => eb.or([eb('id', '=', idOrName), eb('name', '=', idOrName)]));
    return match.orderBy(sql`id = ${idOrName} DESC, tenant_id IS NULL`).limit(1);
  }
}
