import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, renameSync, statSync, unlinkSync } from 'node:fs';
import { open, readFile, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { ReftError } from '../errors.ts';
import { newId } from './ids.ts';
import { interventionRecord } from './intervention-record.ts';
import { endInsteadOfClaim, endedEvent, outcomeColumns, queuedEvent, runningEvent } from './job-lifecycle.ts';
import { Listeners } from './listeners.ts';
import { migrationsUpTo, pendingMigrations, type Migration } from './migrations.ts';
import { clampLimit, pageOf, seqAfter } from './paging.ts';
import { jsonText as json, rowMappers } from './rows.ts';
import type * as Rows from './rows.ts';
import { interventionNameTaken, keySecretTaken, noIntervention, noInterventionToReplace, noJob, noTenant } from './store-errors.ts';
import { checkUsageRange, toUsageDay, usageBatch, type UsageRow } from './usage.ts';
import type {
  ApiKey,
  InterventionFiles,
  InterventionMeta,
  Job,
  JobEvent,
  JobOutcome,
  Lease,
  NewIntervention,
  Page,
  PageRequest,
  Store,
  StoredFile,
  Tenant,
  Usage,
  UsageDay,
  UsageRecord,
} from './store.ts';

/**
 * The embedded Store: one SQLite database plus a directory of blob files, both under a data
 * directory:
 *
 *   <dataDir>/reft.db   tables (WAL mode, so a training worker process can share the file)
 *   <dataDir>/blobs/    intervention files, training data files, job checkpoints
 *
 * It keeps the contract, and makes the choices, written in the header of store.ts. Particular
 * to it:
 * - Time is the writing process's clock: timestamps are its ISO text, lease expiry its epoch ms.
 * - `onInterventionChanged` and `onJobQueued` fire only in the process that made the change:
 *   SQLite has no cross-process notifications. Workers poll `claimJob`.
 * - File bytes live in blob files, not in the database: written and fsynced to a temp file
 *   first, renamed to a final name inside the write transaction that inserts the row naming
 *   it; what a crash leaves behind is swept when the store is next opened.
 *
 * better-sqlite3 is synchronous: every statement runs on the calling thread. Writes are short
 * (blob bytes are written and fsynced before the write transaction starts), but a busy database
 * can make a call wait up to BUSY_TIMEOUT_MS for the other process's lock.
 */

/** How long a statement waits for another connection's write lock before failing. */
const BUSY_TIMEOUT_MS = 10_000;
/** A temp blob this old is abandoned whoever wrote it (covers writers in other pid namespaces). */
const STALE_TEMP_MS = 60 * 60 * 1000;
/** Re-reads of a row whose blob vanished under us (replaced or deleted between two reads). */
const BLOB_READ_RETRIES = 3;

/** Failure-injection points for tests (crash simulation); never set in production. */
export type FaultPoint = 'blobs-written' | 'blobs-renamed';

export interface SqliteStoreOptions {
  /** Called at each FaultPoint of a blob write; a test can kill the process there. */
  faultHook?: (point: FaultPoint) => void;
  /**
   * Migrate only up to this schema version (default: all). Only tests of an upgrade set it, to
   * make a database as an older server left it; never set in production.
   */
  schemaVersion?: number;
}

export async function openSqliteStore(dataDir: string, options: SqliteStoreOptions = {}): Promise<Store> {
  return SqliteStore.open(dataDir, options);
}

// ---------------------------------------------------------------------------------------------
// Schema (migrations.ts: append-only).
// ---------------------------------------------------------------------------------------------

const MIGRATIONS: Migration[] = [
  {
    version: 1,
    name: 'initial',
    sql: `
      -- Every listed table has 'seq INTEGER PRIMARY KEY' (SQLite's rowid, kept by VACUUM): it
      -- numbers rows in insert order, which orders pages and the job queue exactly even when
      -- two rows share a created_at millisecond. 'id' is the public key.
      CREATE TABLE tenants (
        seq        INTEGER PRIMARY KEY,
        id         TEXT NOT NULL UNIQUE,
        name       TEXT NOT NULL,
        created_at TEXT NOT NULL
      );

      CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL REFERENCES tenants (id),
        secret_hash TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL,
        revoked_at  TEXT
      );

      CREATE TABLE interventions (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        tenant_id    TEXT REFERENCES tenants (id),
        name         TEXT NOT NULL,
        description  TEXT,
        source       TEXT NOT NULL,
        config       TEXT NOT NULL,
        version      INTEGER NOT NULL,
        bytes        INTEGER NOT NULL,
        sha256       TEXT NOT NULL,
        config_blob  TEXT NOT NULL,
        weights_blob TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
      );
      -- One name per tenant, and one among shared rows: NULLs are distinct in a plain UNIQUE
      -- index, so shared rows are indexed under ''.
      CREATE UNIQUE INDEX interventions_name ON interventions (ifnull(tenant_id, ''), name);
      CREATE INDEX interventions_tenant ON interventions (tenant_id, seq);

      CREATE TABLE files (
        seq        INTEGER PRIMARY KEY,
        id         TEXT NOT NULL UNIQUE,
        tenant_id  TEXT NOT NULL REFERENCES tenants (id),
        filename   TEXT NOT NULL,
        purpose    TEXT NOT NULL,
        bytes      INTEGER NOT NULL,
        blob       TEXT NOT NULL,
        created_at TEXT NOT NULL
      );
      CREATE INDEX files_tenant ON files (tenant_id, seq);

      CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        tenant_id        TEXT NOT NULL REFERENCES tenants (id),
        status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        spec             TEXT NOT NULL,
        progress         TEXT NOT NULL,
        error            TEXT,
        intervention_id  TEXT REFERENCES interventions (id) ON DELETE SET NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at       TEXT NOT NULL,
        started_at       TEXT,
        finished_at      TEXT,
        lease_worker     TEXT,
        lease_expires_at INTEGER
      );
      CREATE INDEX jobs_tenant ON jobs (tenant_id, seq);
      CREATE INDEX jobs_claimable ON jobs (seq) WHERE status IN ('queued', 'running');
      CREATE INDEX jobs_intervention ON jobs (intervention_id);

      CREATE TABLE job_events (
        job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        type       TEXT NOT NULL,
        data       TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
      );

      CREATE TABLE checkpoints (
        job_id     TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        step       INTEGER NOT NULL,
        blob       TEXT NOT NULL,
        bytes      INTEGER NOT NULL,
        created_at TEXT NOT NULL
      );
    `,
  },
  {
    version: 2,
    name: 'tenant usage',
    sql: `
      -- Usage per tenant and UTC day (YYYY-MM-DD text, which sorts as the dates do); recordUsage
      -- adds to the counters in place.
      CREATE TABLE tenant_usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (id),
        day               TEXT NOT NULL CHECK (day GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'),
        requests          INTEGER NOT NULL DEFAULT 0,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        training_tokens   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, day)
      ) WITHOUT ROWID;
    `,
  },
];

/** Every statement the store runs (named parameters are bound from objects). */
const SQL = {
  // tenants and keys
  insertTenant: `INSERT INTO tenants (id, name, created_at) VALUES (:id, :name, :createdAt)`,
  tenantById: `SELECT * FROM tenants WHERE id = :id`,
  tenantCursor: `SELECT seq FROM tenants WHERE id = :after`,
  tenantPage: `SELECT * FROM tenants WHERE seq > :afterSeq ORDER BY seq LIMIT :limit`,
  insertKey: `
    INSERT INTO api_keys (id, tenant_id, secret_hash, created_at)
    VALUES (:id, :tenantId, :secretHash, :createdAt)`,
  keyById: `SELECT * FROM api_keys WHERE id = :id`,
  liveKeyByHash: `
    SELECT k.*, t.name AS tenant_name, t.created_at AS tenant_created_at
    FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
    WHERE k.secret_hash = :secretHash AND k.revoked_at IS NULL`,
  revokeKey: `UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL`,

  // interventions. `tenant_id IS :tenant` matches NULL to NULL, so a null tenant means "shared".
  insertIntervention: `
    INSERT INTO interventions (id, tenant_id, name, description, source, config, version, bytes, sha256,
                               config_blob, weights_blob, created_at, updated_at)
    VALUES (:id, :tenantId, :name, :description, :source, :config, 1, :bytes, :sha256,
            :configBlob, :weightsBlob, :now, :now)`,
  replaceIntervention: `
    UPDATE interventions
    SET name = :name, description = :description, source = :source, config = :config,
        version = version + 1, bytes = :bytes, sha256 = :sha256,
        config_blob = :configBlob, weights_blob = :weightsBlob, updated_at = :now
    WHERE id = :id`,
  interventionById: `SELECT * FROM interventions WHERE id = :id`,
  ownIntervention: `SELECT * FROM interventions WHERE id = :id AND tenant_id IS :tenant`,
  // An id match first, then the tenant's own name, then a shared name.
  findIntervention: `
    SELECT * FROM interventions
    WHERE (tenant_id IS :tenant OR tenant_id IS NULL) AND (id = :key OR name = :key)
    ORDER BY id = :key DESC, tenant_id IS NULL ASC
    LIMIT 1`,
  interventionCursor: `
    SELECT seq FROM interventions WHERE id = :after AND (tenant_id IS :tenant OR tenant_id IS NULL)`,
  interventionPage: `
    SELECT * FROM interventions
    WHERE (tenant_id IS :tenant OR tenant_id IS NULL) AND seq > :afterSeq
    ORDER BY seq LIMIT :limit`,
  deleteIntervention: `
    DELETE FROM interventions WHERE id = :id AND tenant_id IS :tenant RETURNING config_blob, weights_blob`,
  usage: `SELECT count(*) AS interventions, ifnull(sum(bytes), 0) AS bytes FROM interventions WHERE tenant_id = :tenant`,

  // usage accounting. An entry whose tenant does not exist inserts nothing (the WHERE also
  // settles the INSERT ... SELECT ... ON CONFLICT parsing ambiguity SQLite documents).
  addUsage: `
    INSERT INTO tenant_usage (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens)
    SELECT :tenantId, :day, :requests, :promptTokens, :completionTokens, :trainingTokens
    WHERE EXISTS (SELECT 1 FROM tenants WHERE id = :tenantId)
    ON CONFLICT (tenant_id, day) DO UPDATE
    SET requests = requests + excluded.requests,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        training_tokens = training_tokens + excluded.training_tokens`,
  usageDays: `
    SELECT day, requests, prompt_tokens, completion_tokens, training_tokens FROM tenant_usage
    WHERE tenant_id = :tenant AND day BETWEEN :from AND :to
    ORDER BY day`,

  // training data files
  insertFile: `
    INSERT INTO files (id, tenant_id, filename, purpose, bytes, blob, created_at)
    VALUES (:id, :tenantId, :filename, :purpose, :bytes, :blob, :createdAt)`,
  fileById: `SELECT * FROM files WHERE id = :id AND tenant_id = :tenant`,
  fileCursor: `SELECT seq FROM files WHERE id = :after AND tenant_id = :tenant`,
  filePage: `SELECT * FROM files WHERE tenant_id = :tenant AND seq > :afterSeq ORDER BY seq LIMIT :limit`,
  deleteFile: `DELETE FROM files WHERE id = :id AND tenant_id = :tenant RETURNING blob`,

  // jobs
  insertJob: `
    INSERT INTO jobs (id, tenant_id, status, spec, progress, created_at)
    VALUES (:id, :tenantId, 'queued', :spec, 'null', :createdAt)`,
  jobById: `SELECT * FROM jobs WHERE id = :id`,
  // A null tenant is the worker or an administrator: any job.
  scopedJob: `SELECT * FROM jobs WHERE id = :id AND (:tenant IS NULL OR tenant_id = :tenant)`,
  jobCursor: `SELECT seq FROM jobs WHERE id = :after AND tenant_id = :tenant`,
  jobPage: `SELECT * FROM jobs WHERE tenant_id = :tenant AND seq > :afterSeq ORDER BY seq LIMIT :limit`,
  nextClaimable: `
    SELECT * FROM jobs
    WHERE status IN ('queued', 'running') AND (status = 'queued' OR lease_expires_at <= :now)
    ORDER BY seq LIMIT 1`,
  claimJob: `
    UPDATE jobs
    SET status = 'running', attempts = attempts + 1, started_at = ifnull(started_at, :startedAt),
        lease_worker = :workerId, lease_expires_at = :expiresAt
    WHERE id = :id`,
  // Ends a job whatever holds it (claim-time give-ups, cancelling a queued job).
  endJob: `
    UPDATE jobs
    SET status = :status, error = :error, finished_at = :finishedAt, lease_worker = NULL, lease_expires_at = NULL
    WHERE id = :id`,
  requestCancel: `UPDATE jobs SET cancel_requested = 1 WHERE id = :id`,
  // The lease-holder guard shared by every worker write: the worker named holds an unexpired lease.
  renewLease: `
    UPDATE jobs SET lease_expires_at = :expiresAt
    WHERE id = :id AND status = 'running' AND lease_worker = :workerId AND lease_expires_at > :now`,
  updateProgress: `
    UPDATE jobs SET progress = :progress
    WHERE id = :id AND status = 'running' AND lease_worker = :workerId AND lease_expires_at > :now`,
  finishJob: `
    UPDATE jobs
    SET status = :status, error = :error, intervention_id = :interventionId, finished_at = :finishedAt,
        lease_worker = NULL, lease_expires_at = NULL
    WHERE id = :id AND status = 'running' AND lease_worker = :workerId AND lease_expires_at > :now`,
  leaseHeld: `
    SELECT 1 FROM jobs
    WHERE id = :id AND status = 'running' AND lease_worker = :workerId AND lease_expires_at > :now`,
  insertEvent: `
    INSERT INTO job_events (job_id, seq, created_at, type, data)
    VALUES (:jobId, (SELECT ifnull(max(seq), 0) + 1 FROM job_events WHERE job_id = :jobId), :createdAt, :type, :data)
    RETURNING *`,
  eventsAfter: `SELECT * FROM job_events WHERE job_id = :jobId AND seq > :afterSeq ORDER BY seq LIMIT :limit`,
  checkpointByJob: `SELECT * FROM checkpoints WHERE job_id = :jobId`,
  upsertCheckpoint: `
    INSERT INTO checkpoints (job_id, step, blob, bytes, created_at) VALUES (:jobId, :step, :blob, :bytes, :createdAt)
    ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, blob = excluded.blob, bytes = excluded.bytes,
                                       created_at = excluded.created_at`,

  // blob bookkeeping
  referencedBlobs: `
    SELECT config_blob AS name FROM interventions UNION ALL
    SELECT weights_blob FROM interventions UNION ALL
    SELECT blob FROM files UNION ALL
    SELECT blob FROM checkpoints`,
} as const;

// ---------------------------------------------------------------------------------------------
// Rows as SQLite returns them (rows.ts maps them): timestamps as ISO text, JSON as text,
// booleans as 0/1; plus what this store reads beyond the mapped columns (blob names, lease).
// ---------------------------------------------------------------------------------------------

type Columns = { time: string; json: string; flag: number };

type TenantRow = Rows.TenantRow<Columns>;
type KeyRow = Rows.KeyRow<Columns>;
type EventRow = Rows.EventRow<Columns>;

interface InterventionRow extends Rows.InterventionRow<Columns> {
  config_blob: string;
  weights_blob: string;
}

interface FileRow extends Rows.FileRow<Columns> {
  blob: string;
}

interface JobRow extends Rows.JobRow<Columns> {
  lease_worker: string | null;
  lease_expires_at: number | null;
}

interface CheckpointRow {
  job_id: string;
  step: number;
  blob: string;
}

const { toTenant, toKey, toKeyWithTenant, toIntervention, toFile, toJob, toEvent } = rowMappers<Columns>({
  time: (text) => text,
  json: (text) => JSON.parse(text),
  flag: (flag) => flag === 1,
});

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const isoNow = (): string => new Date().toISOString();

function sqliteCode(e: unknown): string | undefined {
  return e instanceof Database.SqliteError ? e.code : undefined;
}

/** Runs a write that names a tenant: a missing tenant is a not_found on "tenantId". */
function requireTenant<T>(tenantId: string | null, write: () => T): T {
  try {
    return write();
  } catch (e) {
    if (sqliteCode(e) === 'SQLITE_CONSTRAINT_FOREIGNKEY') throw noTenant(tenantId);
    throw e;
  }
}

function isMissing(e: unknown): boolean {
  return (e as NodeJS.ErrnoException)?.code === 'ENOENT';
}

// ---------------------------------------------------------------------------------------------
// Blob files
// ---------------------------------------------------------------------------------------------

/** Temp files are named tmp~<host>~<pid>~<random> so a sweeper can tell whether the writer lives. */
const TEMP_PREFIX = 'tmp~';
/** Final blob names: <row id>.<random>.<kind>; anything else in blobs/ is left alone. */
const FINAL_NAME = /^(iv|file|job)_[0-9a-f]{24}\.[0-9a-f]{8}\.(config|weights|data|ckpt)$/;

function blobName(ownerId: string, kind: 'config' | 'weights' | 'data' | 'ckpt'): string {
  return `${ownerId}.${randomBytes(4).toString('hex')}.${kind}`;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * The blobs/ directory. A blob is written whole to a temp file and fsynced, then renamed to its
 * final name inside the write transaction that inserts the row naming it, so a final name is
 * always either referenced by a committed row or an orphan of a crash, which `sweep` removes.
 */
class BlobDir {
  constructor(readonly dir: string) {}

  private path(name: string): string {
    return join(this.dir, name);
  }

  /** Writes bytes to a new temp file, fsynced; returns its name. */
  async writeTemp(bytes: Uint8Array): Promise<string> {
    const name = `${TEMP_PREFIX}${hostname()}~${process.pid}~${randomBytes(8).toString('hex')}`;
    const fh = await open(this.path(name), 'wx');
    try {
      await fh.writeFile(bytes);
      await fh.sync();
    } catch (e) {
      await fh.close();
      await this.discard([name]);
      throw e;
    }
    await fh.close();
    return name;
  }

  /** Gives a temp file its final name and makes the rename durable. Sync: runs inside a transaction. */
  promote(temp: string, final: string): void {
    renameSync(this.path(temp), this.path(final));
    // Without this a power cut could keep the committed row but lose the rename.
    const fd = openSync(this.dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  /** The blob's bytes, or null if it is gone. */
  async read(name: string): Promise<Uint8Array | null> {
    try {
      const buf = await readFile(this.path(name));
      return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    } catch (e) {
      if (isMissing(e)) return null;
      throw e;
    }
  }

  async remove(names: string[]): Promise<void> {
    await Promise.all(
      names.map((n) =>
        unlink(this.path(n)).catch((e) => {
          if (!isMissing(e)) throw e;
        }),
      ),
    );
  }

  /**
   * Removes blobs no committed row names any more. Never throws: the caller's write has already
   * committed (or already failed with its own error), and a file left behind is swept at open.
   */
  async discard(names: string[]): Promise<void> {
    await this.remove(names).catch((e) => process.emitWarning(`could not remove unused blobs: ${(e as Error).message}`));
  }

  removeSync(names: string[]): void {
    for (const n of names) {
      try {
        unlinkSync(this.path(n));
      } catch (e) {
        if (!isMissing(e)) throw e;
      }
    }
  }

  /**
   * Removes what crashes leave behind: temp files whose writer is gone (or that are too old to
   * be anyone's), and final blobs no row references. Sync: the caller holds the write lock, so
   * no other process is between a rename and its commit.
   */
  sweep(referenced: Set<string>): void {
    const now = Date.now();
    for (const name of readdirSync(this.dir)) {
      if (name.startsWith(TEMP_PREFIX)) {
        if (this.abandonedTemp(name, now)) this.removeSync([name]);
      } else if (FINAL_NAME.test(name) && !referenced.has(name)) {
        this.removeSync([name]);
      }
    }
  }

  private abandonedTemp(name: string, now: number): boolean {
    let mtimeMs: number;
    try {
      mtimeMs = statSync(this.path(name)).mtimeMs;
    } catch (e) {
      if (isMissing(e)) return false;
      throw e;
    }
    if (now - mtimeMs > STALE_TEMP_MS) return true;
    const [, host, pid] = name.split('~');
    // A pid means something only on this host (and in this pid namespace, hence also the age rule).
    return host === hostname() && !processAlive(Number(pid));
  }
}

interface PendingBlob {
  name: string;
  bytes: Uint8Array;
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

export class SqliteStore implements Store {
  private readonly statements = new Map<string, Database.Statement>();
  private readonly interventionListeners = new Listeners<[id: string]>();
  private readonly jobListeners = new Listeners<[]>();

  private constructor(
    private readonly db: Database.Database,
    private readonly blobs: BlobDir,
    private readonly options: SqliteStoreOptions,
  ) {}

  /** Opens (creating if needed) the store under dataDir: migrates the schema, sweeps crash leftovers. */
  static async open(dataDir: string, options: SqliteStoreOptions = {}): Promise<SqliteStore> {
    const blobDir = join(dataDir, 'blobs');
    mkdirSync(blobDir, { recursive: true });
    const db = new Database(join(dataDir, 'reft.db'), { timeout: BUSY_TIMEOUT_MS });
    try {
      configure(db);
      migrate(db, migrationsUpTo(MIGRATIONS, options.schemaVersion));
      const store = new SqliteStore(db, new BlobDir(blobDir), options);
      store.sweepBlobs();
      return store;
    } catch (e) {
      db.close();
      throw e;
    }
  }

  // --- tenants and keys ---------------------------------------------------------------------

  async createTenant(name: string): Promise<Tenant> {
    const row: TenantRow = { id: newId('tenant'), name, created_at: isoNow() };
    this.run(SQL.insertTenant, { id: row.id, name, createdAt: row.created_at });
    return toTenant(row);
  }

  async getTenant(id: string): Promise<Tenant | null> {
    const row = this.get<TenantRow>(SQL.tenantById, { id });
    return row ? toTenant(row) : null;
  }

  async listTenants(page: PageRequest): Promise<Page<Tenant>> {
    return this.page(SQL.tenantCursor, SQL.tenantPage, {}, page, toTenant);
  }

  async createApiKey(tenantId: string, secretHash: string): Promise<ApiKey> {
    const id = newId('key');
    try {
      requireTenant(tenantId, () => this.run(SQL.insertKey, { id, tenantId, secretHash, createdAt: isoNow() }));
    } catch (e) {
      if (sqliteCode(e) === 'SQLITE_CONSTRAINT_UNIQUE') throw keySecretTaken();
      throw e;
    }
    return toKey(this.get<KeyRow>(SQL.keyById, { id })!);
  }

  async findApiKey(secretHash: string): Promise<{ key: ApiKey; tenant: Tenant } | null> {
    const row = this.get<Rows.KeyWithTenantRow<Columns>>(SQL.liveKeyByHash, { secretHash });
    return row ? toKeyWithTenant(row) : null;
  }

  async revokeApiKey(id: string): Promise<boolean> {
    return this.run(SQL.revokeKey, { id, now: isoNow() }).changes === 1;
  }

  // --- interventions ------------------------------------------------------------------------

  async putIntervention(iv: NewIntervention, replaceId?: string): Promise<InterventionMeta> {
    // Refuses a replaceId the store could not have made: the id becomes part of file names.
    const record = interventionRecord(iv, replaceId);
    const { id } = record;
    const configBlob = blobName(id, 'config');
    const weightsBlob = blobName(id, 'weights');
    const params = { ...record, configBlob, weightsBlob, now: isoNow() };
    let replaced: string[] = [];
    const pending = [
      { name: configBlob, bytes: iv.files.config },
      { name: weightsBlob, bytes: iv.files.weights },
    ];
    await this.writeWithBlobs(pending, (promote) => {
      if (replaceId !== undefined) {
        const old = this.get<InterventionRow>(SQL.ownIntervention, { id: replaceId, tenant: iv.tenantId });
        if (!old) throw noInterventionToReplace(replaceId);
        replaced = [old.config_blob, old.weights_blob];
      }
      promote();
      try {
        requireTenant(iv.tenantId, () => this.run(replaceId === undefined ? SQL.insertIntervention : SQL.replaceIntervention, params));
      } catch (e) {
        if (sqliteCode(e) === 'SQLITE_CONSTRAINT_UNIQUE') throw interventionNameTaken(iv.name);
        throw e;
      }
    });
    const meta = toIntervention(this.get<InterventionRow>(SQL.interventionById, { id })!);
    if (replaceId !== undefined) {
      // Only now, after the commit, are the old files unreferenced.
      await this.blobs.discard(replaced);
      this.interventionListeners.emit(id);
    }
    return meta;
  }

  async findIntervention(tenantId: string | null, idOrName: string): Promise<InterventionMeta | null> {
    const row = this.get<InterventionRow>(SQL.findIntervention, { tenant: tenantId, key: idOrName });
    return row ? toIntervention(row) : null;
  }

  async listInterventions(tenantId: string | null, page: PageRequest): Promise<Page<InterventionMeta>> {
    return this.page(SQL.interventionCursor, SQL.interventionPage, { tenant: tenantId }, page, toIntervention);
  }

  async readInterventionFiles(id: string): Promise<InterventionFiles | null> {
    const found = await this.readBlobs(
      () => this.get<InterventionRow>(SQL.interventionById, { id }),
      (row) => [row.config_blob, row.weights_blob],
    );
    return found ? { config: found[0], weights: found[1] } : null;
  }

  async deleteIntervention(tenantId: string | null, id: string): Promise<boolean> {
    const row = this.get<{ config_blob: string; weights_blob: string }>(SQL.deleteIntervention, { id, tenant: tenantId });
    if (!row) return false;
    // The row is gone (committed) first, so a crash here leaves only orphans for the sweep.
    await this.blobs.discard([row.config_blob, row.weights_blob]);
    this.interventionListeners.emit(id);
    return true;
  }

  async usage(tenantId: string): Promise<Usage> {
    return this.get<Usage>(SQL.usage, { tenant: tenantId })!;
  }

  // --- usage accounting ---------------------------------------------------------------------

  async recordUsage(entries: UsageRecord[]): Promise<void> {
    const rows = usageBatch(entries);
    if (rows.length === 0) return;
    // IMMEDIATE: the tenant check and the upsert of every row happen under the write lock, so
    // writers in other processes wait for each other instead of losing increments.
    this.transaction(() => {
      for (const row of rows) this.run(SQL.addUsage, { ...row });
    });
  }

  async getUsage(tenantId: string, from: string, to: string): Promise<UsageDay[]> {
    checkUsageRange(from, to);
    return this.all<UsageRow>(SQL.usageDays, { tenant: tenantId, from, to }).map(toUsageDay);
  }

  // --- training data files ------------------------------------------------------------------

  async putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<StoredFile> {
    const id = newId('file');
    const row: FileRow = { id, tenant_id: tenantId, filename, purpose, bytes: bytes.byteLength, blob: blobName(id, 'data'), created_at: isoNow() };
    await this.writeWithBlobs([{ name: row.blob, bytes }], (promote) => {
      promote();
      requireTenant(tenantId, () =>
        this.run(SQL.insertFile, { id, tenantId, filename, purpose, bytes: row.bytes, blob: row.blob, createdAt: row.created_at }),
      );
    });
    return toFile(row);
  }

  async getFile(tenantId: string, id: string): Promise<StoredFile | null> {
    const row = this.get<FileRow>(SQL.fileById, { id, tenant: tenantId });
    return row ? toFile(row) : null;
  }

  async readFile(tenantId: string, id: string): Promise<Uint8Array | null> {
    const found = await this.readBlobs(
      () => this.get<FileRow>(SQL.fileById, { id, tenant: tenantId }),
      (row) => [row.blob],
    );
    return found ? found[0] : null;
  }

  async listFiles(tenantId: string, page: PageRequest): Promise<Page<StoredFile>> {
    return this.page(SQL.fileCursor, SQL.filePage, { tenant: tenantId }, page, toFile);
  }

  async deleteFile(tenantId: string, id: string): Promise<boolean> {
    const row = this.get<{ blob: string }>(SQL.deleteFile, { id, tenant: tenantId });
    if (!row) return false;
    await this.blobs.discard([row.blob]);
    return true;
  }

  // --- training jobs ------------------------------------------------------------------------

  async createJob(tenantId: string, spec: unknown): Promise<Job> {
    const id = newId('job');
    this.transaction(() => {
      requireTenant(tenantId, () => this.run(SQL.insertJob, { id, tenantId, spec: json(spec), createdAt: isoNow() }));
      this.addEvent(id, 'status', queuedEvent());
    });
    this.jobListeners.emit();
    return toJob(this.get<JobRow>(SQL.jobById, { id })!);
  }

  async getJob(tenantId: string | null, id: string): Promise<Job | null> {
    const row = this.get<JobRow>(SQL.scopedJob, { id, tenant: tenantId });
    return row ? toJob(row) : null;
  }

  async listJobs(tenantId: string, page: PageRequest): Promise<Page<Job>> {
    return this.page(SQL.jobCursor, SQL.jobPage, { tenant: tenantId }, page, toJob);
  }

  async requestCancel(tenantId: string, id: string): Promise<Job | null> {
    return this.transaction(() => {
      const row = this.get<JobRow>(SQL.scopedJob, { id, tenant: tenantId });
      if (!row) return null;
      if (row.status === 'queued') {
        this.run(SQL.requestCancel, { id });
        this.endJob(id, 'cancelled', null);
      } else if (row.status === 'running') {
        // The worker sees cancelRequested when it next reads the job, and finishes it as cancelled.
        this.run(SQL.requestCancel, { id });
      }
      return toJob(this.get<JobRow>(SQL.jobById, { id })!);
    });
  }

  async claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: Job; lease: Lease } | null> {
    // IMMEDIATE: the read of the candidate and its update hold the write lock together, so two
    // workers (in any process) can never both take the same job.
    return this.transaction(() => {
      for (;;) {
        const now = Date.now();
        const row = this.get<JobRow>(SQL.nextClaimable, { now });
        if (!row) return null;
        const end = endInsteadOfClaim({ cancelRequested: row.cancel_requested === 1, attempts: row.attempts }, maxAttempts);
        if (end) {
          this.endJob(row.id, end.status, end.error);
          continue;
        }
        const expiresAt = now + leaseMs;
        this.run(SQL.claimJob, { id: row.id, workerId, expiresAt, startedAt: new Date(now).toISOString() });
        this.addEvent(row.id, 'status', runningEvent(row.attempts + 1));
        const job = toJob(this.get<JobRow>(SQL.jobById, { id: row.id })!);
        return { job, lease: { jobId: row.id, workerId, expiresAt } };
      }
    });
  }

  async renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean> {
    const now = Date.now();
    return this.run(SQL.renewLease, { id: jobId, workerId, now, expiresAt: now + leaseMs }).changes === 1;
  }

  async updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean> {
    return this.run(SQL.updateProgress, { id: jobId, workerId, now: Date.now(), progress: json(progress) }).changes === 1;
  }

  async appendJobEvent(jobId: string, type: string, data: unknown): Promise<JobEvent> {
    return this.transaction(() => {
      if (!this.get(SQL.jobById, { id: jobId })) throw noJob(jobId);
      return this.addEvent(jobId, type, data);
    });
  }

  async listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<JobEvent[]> {
    return this.all<EventRow>(SQL.eventsAfter, { jobId, afterSeq, limit: clampLimit(limit) }).map(toEvent);
  }

  async saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean> {
    const blob = blobName(jobId, 'ckpt');
    let replaced: string | undefined;
    const saved = await this.writeWithBlobs([{ name: blob, bytes: state }], (promote) => {
      if (!this.get(SQL.leaseHeld, { id: jobId, workerId, now: Date.now() })) return false;
      replaced = this.get<CheckpointRow>(SQL.checkpointByJob, { jobId })?.blob;
      promote();
      this.run(SQL.upsertCheckpoint, { jobId, step, blob, bytes: state.byteLength, createdAt: isoNow() });
      return true;
    });
    if (replaced !== undefined) await this.blobs.discard([replaced]);
    return saved;
  }

  async loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null> {
    let step = 0;
    const found = await this.readBlobs(
      () => this.get<CheckpointRow>(SQL.checkpointByJob, { jobId }),
      (row) => {
        step = row.step;
        return [row.blob];
      },
    );
    return found ? { step, state: found[0] } : null;
  }

  async finishJob(jobId: string, workerId: string, outcome: JobOutcome): Promise<boolean> {
    const { error, interventionId } = outcomeColumns(outcome);
    return this.transaction(() => {
      const params = { id: jobId, workerId, now: Date.now(), status: outcome.status, error, interventionId, finishedAt: isoNow() };
      if (this.runNamingIntervention(SQL.finishJob, params, interventionId).changes !== 1) return false;
      this.addEvent(jobId, 'status', endedEvent(outcome.status, error, interventionId));
      return true;
    });
  }

  // --- listeners and lifecycle --------------------------------------------------------------

  onInterventionChanged(listener: (id: string) => void): () => void {
    return this.interventionListeners.add(listener);
  }

  onJobQueued(listener: () => void): () => void {
    return this.jobListeners.add(listener);
  }

  async close(): Promise<void> {
    if (this.db.open) this.db.close();
  }

  // --- internals ----------------------------------------------------------------------------

  private stmt(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.statements.set(sql, s);
    }
    return s;
  }

  private get<R>(sql: string, params: Record<string, unknown>): R | undefined {
    return this.stmt(sql).get(params) as R | undefined;
  }

  private all<R>(sql: string, params: Record<string, unknown>): R[] {
    return this.stmt(sql).all(params) as R[];
  }

  private run(sql: string, params: Record<string, unknown>): Database.RunResult {
    return this.stmt(sql).run(params);
  }

  /**
   * A write transaction. Always BEGIN IMMEDIATE: a deferred transaction that reads and then
   * writes can fail with SQLITE_BUSY at once when another process wrote in between, without
   * waiting out the busy timeout.
   */
  private transaction<T>(body: () => T): T {
    return this.db.transaction(body).immediate();
  }

  /**
   * Writes blobs to temp files (fsynced, outside any lock), then runs `body` in a write
   * transaction. `body` calls `promote()` to rename the temp files to their final names, and
   * must do so before inserting rows that name them. On any failure, or if `body` never
   * promotes, every file this call made is removed; a crash instead leaves them for the sweep.
   */
  private async writeWithBlobs<T>(pending: PendingBlob[], body: (promote: () => void) => T): Promise<T> {
    const temps: string[] = [];
    let promoted = false;
    try {
      for (const blob of pending) temps.push(await this.blobs.writeTemp(blob.bytes));
      this.options.faultHook?.('blobs-written');
      const promote = () => {
        pending.forEach((blob, i) => this.blobs.promote(temps[i], blob.name));
        promoted = true;
        this.options.faultHook?.('blobs-renamed');
      };
      const result = this.transaction(() => body(promote));
      if (!promoted) await this.blobs.discard(temps);
      return result;
    } catch (e) {
      // The transaction rolled back, so no row names any of these files (final names are fresh
      // random ones, so removing them can't touch another call's blob).
      await this.blobs.discard([...temps, ...pending.map((b) => b.name)]);
      throw e;
    }
  }

  /**
   * Reads a row's blobs. A concurrent replace or delete can remove a blob between reading the
   * row and the file, so a missing blob means: read the row again.
   */
  private async readBlobs<R>(load: () => R | undefined, names: (row: R) => string[]): Promise<Uint8Array[] | null> {
    for (let attempt = 0; ; attempt++) {
      const row = load();
      if (!row) return null;
      const data = await Promise.all(names(row).map((n) => this.blobs.read(n)));
      if (data.every((d) => d !== null)) return data as Uint8Array[];
      if (attempt >= BLOB_READ_RETRIES) throw new ReftError('internal', `a stored file is missing from ${this.blobs.dir}`);
    }
  }

  private page<R extends { id: string }, T>(
    cursorSql: string,
    pageSql: string,
    scope: Record<string, unknown>,
    req: PageRequest,
    map: (row: R) => T,
  ): Page<T> {
    const limit = clampLimit(req.limit);
    const cursor = req.after === undefined ? undefined : this.get<{ seq: number }>(cursorSql, { ...scope, after: req.after });
    const rows = this.all<R>(pageSql, { ...scope, afterSeq: seqAfter(req.after, cursor), limit: limit + 1 });
    return pageOf(rows, limit, map);
  }

  /** A write whose `interventionId` must exist: a dangling one is a not_found, not a raw SQLite error. */
  private runNamingIntervention(sql: string, params: Record<string, unknown>, interventionId: string | null): Database.RunResult {
    try {
      return this.run(sql, params);
    } catch (e) {
      if (sqliteCode(e) === 'SQLITE_CONSTRAINT_FOREIGNKEY') throw noIntervention(interventionId);
      throw e;
    }
  }

  private addEvent(jobId: string, type: string, data: unknown): JobEvent {
    return toEvent(this.get<EventRow>(SQL.insertEvent, { jobId, type, data: json(data), createdAt: isoNow() })!);
  }

  /** Ends a job regardless of its lease (queued cancel, claim-time give-up), with its status event. */
  private endJob(id: string, status: 'cancelled' | 'failed', error: string | null): void {
    this.run(SQL.endJob, { id, status, error, finishedAt: isoNow() });
    this.addEvent(id, 'status', endedEvent(status, error));
  }

  private sweepBlobs(): void {
    this.transaction(() => {
      const referenced = new Set(this.all<{ name: string }>(SQL.referencedBlobs, {}).map((r) => r.name));
      this.blobs.sweep(referenced);
    });
  }
}

function configure(db: Database.Database): void {
  // WAL lets readers (the server) go on while a writer (the worker) commits.
  const mode = db.pragma('journal_mode = WAL', { simple: true });
  if (mode !== 'wal') throw new Error(`SQLite could not use WAL mode for ${db.name} (got "${mode}")`);
  // FULL, not NORMAL: blobs are deleted right after a commit, so a commit must never be lost.
  db.pragma('synchronous = FULL');
  db.pragma('foreign_keys = ON');
}

/**
 * Applies the migrations this database lacks, in order, in one IMMEDIATE transaction: a second
 * process opening the same file at the same time waits, then finds them applied.
 */
function migrate(db: Database.Database, migrations: readonly Migration[]): void {
  db.transaction(() => {
    db.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
      version    INTEGER PRIMARY KEY,
      name       TEXT NOT NULL,
      applied_at TEXT NOT NULL
    )`);
    const applied = new Set(
      (db.prepare('SELECT version FROM schema_migrations').all() as { version: number }[]).map((r) => r.version),
    );
    const pending = pendingMigrations(migrations, applied, db.name);
    const record = db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)');
    for (const m of pending) {
      db.exec(m.sql);
      record.run(m.version, m.name, isoNow());
    }
  }).immediate();
}
