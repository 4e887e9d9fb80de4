import { Client, DatabaseError, Pool, TypeOverrides } from 'pg';
import type { ClientConfig, Notification, PoolClient, PoolConfig, QueryResult, QueryResultRow } from 'pg';
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
  JobStatus,
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
 * The PostgreSQL Store: everything, file bytes included (bytea), lives in one database, so
 * servers and training workers on different hosts share it.
 *
 * It keeps the contract, and makes the choices, written in the header of store.ts (its hidden
 * creation order is an identity column). Particular to it:
 *
 * - Time comes from the database clock (now()): createdAt & co., and lease expiry, so hosts with
 *   skewed clocks still agree on whether a lease has expired. `now()` is the start of the
 *   transaction, so every row and event one write makes carries the same timestamp.
 * - Listeners fire in every process: a write that deletes or replaces an intervention, or queues
 *   a job, sends NOTIFY in its transaction (delivered only on commit). Each process keeps one
 *   LISTEN connection. The writing process fires its own listeners at once after the commit (as
 *   the SQLite store does) and skips the echo of its own NOTIFY, recognised by the sending
 *   backend's pid, so each listener fires exactly once per change. While the LISTEN connection is
 *   down, other processes' notifications are lost; after it reconnects, job listeners are woken
 *   once (a spurious wake is harmless, a lost one would stall an idle worker), and intervention
 *   caches stay correct because they key on (id, version), which findIntervention reads fresh.
 * - Every write is one transaction (one statement, or BEGIN...COMMIT); a transaction that hits
 *   a deadlock or serialization failure is retried a few times.
 * - When the database is unreachable (down, restarting, network), calls fail fast with
 *   ReftError 'unavailable' (HTTP 503 with Retry-After). The pool replaces dead connections by
 *   itself, and the LISTEN connection reconnects with backoff, so the store works again once the
 *   database is back, without being reopened.
 *
 * Job queue: claimJob locks the oldest claimable row with FOR NO KEY UPDATE SKIP LOCKED (the
 * FOR UPDATE variant that UPDATE itself takes: it still excludes other claimers, but not the
 * foreign-key checks of event inserts), so concurrent claimers never wait on each other and never
 * take the same job.
 */

export interface PostgresStoreOptions {
  /** Connections this process's pool may open (default 10). */
  maxConnections?: number;
  /** Server-side limit for one statement, in ms (default 30 s). */
  statementTimeoutMs?: number;
  /**
   * Told about trouble no caller sees, and recovery from it: an idle pool connection dying, the
   * LISTEN connection lost and back. Default: a process warning.
   */
  log?: (message: string) => void;
  /**
   * Migrate only up to this schema version (default: all). Only tests of an upgrade set it, to
   * make a database as an older server left it; never set in production.
   */
  schemaVersion?: number;
}

export async function openPostgresStore(url: string, options: PostgresStoreOptions = {}): Promise<Store> {
  return PostgresStore.open(url, options);
}

/** Connect attempts give up after this: an unreachable database must fail a request fast. */
const CONNECT_TIMEOUT_MS = 2_000;
const DEFAULT_STATEMENT_TIMEOUT_MS = 30_000;
/** Idle pool connections are closed after this. */
const IDLE_TIMEOUT_MS = 30_000;
/** A session stuck inside a transaction (a hung process) is ended by the server after this. */
const IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000;
/** What an 'unavailable' error tells clients to wait before retrying. */
const RETRY_AFTER_SECONDS = 2;
/** Attempts of a transaction that fails with a deadlock or serialization failure. */
const TRANSACTION_ATTEMPTS = 3;
/** Listener reconnect backoff: doubling from the first delay up to the cap (with jitter). */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 2_000;
/** The listener checks its connection this often: a dead TCP peer may never send a reset. */
const LISTENER_PING_MS = 15_000;
const LISTENER_PING_TIMEOUT_MS = 5_000;
/** How long a closed pool connection's backend pid still counts as ours (its NOTIFY echo may be in flight). */
const ECHO_GRACE_MS = 60_000;
/** pg_advisory_xact_lock key serialising migrations across processes ('reft' in ASCII). */
const MIGRATION_LOCK_KEY = 0x72656674;

/** NOTIFY channels (per database, so stores on different databases never hear each other). */
export const CHANNELS = {
  /** Payload: the intervention id. */
  interventionChanged: 'reft_intervention_changed',
  /** Payload: the job id. */
  jobQueued: 'reft_job_queued',
} as const;

// ---------------------------------------------------------------------------------------------
// Schema (migrations.ts: append-only).
// ---------------------------------------------------------------------------------------------

const MIGRATIONS: Migration[] = [
  {
    version: 1,
    name: 'initial',
    sql: `
      -- Listed tables have 'seq', an identity column: it numbers rows in insert order, which
      -- orders pages and the job queue exactly even when two rows share a timestamp. 'id' is the
      -- public key.
      CREATE TABLE tenants (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id         text NOT NULL UNIQUE,
        name       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      );

      CREATE TABLE api_keys (
        id          text PRIMARY KEY,
        tenant_id   text NOT NULL REFERENCES tenants (id),
        secret_hash text NOT NULL UNIQUE,
        created_at  timestamptz NOT NULL DEFAULT now(),
        revoked_at  timestamptz
      );

      -- json, not jsonb, for documents the store only hands back: it keeps the text as written.
      CREATE TABLE interventions (
        seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id           text NOT NULL UNIQUE,
        tenant_id    text REFERENCES tenants (id),
        name         text NOT NULL,
        description  text,
        source       text NOT NULL,
        config       json NOT NULL,
        version      integer NOT NULL DEFAULT 1,
        bytes        bigint NOT NULL,
        sha256       text NOT NULL,
        config_file  bytea NOT NULL,
        weights_file bytea NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        updated_at   timestamptz NOT NULL DEFAULT now()
      );
      -- Float weights don't compress: skip the attempt, store them out of line as they are.
      ALTER TABLE interventions ALTER COLUMN weights_file SET STORAGE EXTERNAL;
      -- One name per tenant, and one among shared rows (NULLs are distinct in a plain UNIQUE
      -- index, so shared rows are indexed under ''). Name first: it also serves lookups by name.
      CREATE UNIQUE INDEX interventions_name ON interventions (name, (coalesce(tenant_id, '')));
      CREATE INDEX interventions_tenant ON interventions (tenant_id, seq);

      CREATE TABLE files (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id         text NOT NULL UNIQUE,
        tenant_id  text NOT NULL REFERENCES tenants (id),
        filename   text NOT NULL,
        purpose    text NOT NULL,
        bytes      bigint NOT NULL,
        data       bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      );
      CREATE INDEX files_tenant ON files (tenant_id, seq);

      -- event_seq: the last event number given out for the job. Bumping it locks the job row,
      -- so concurrent appends to one job get consecutive numbers instead of colliding.
      CREATE TABLE jobs (
        seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id               text NOT NULL UNIQUE,
        tenant_id        text NOT NULL REFERENCES tenants (id),
        status           text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        spec             json NOT NULL,
        progress         json NOT NULL DEFAULT 'null',
        error            text,
        intervention_id  text REFERENCES interventions (id) ON DELETE SET NULL,
        attempts         integer NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false,
        created_at       timestamptz NOT NULL DEFAULT now(),
        started_at       timestamptz,
        finished_at      timestamptz,
        lease_worker     text,
        lease_expires_at timestamptz,
        event_seq        integer NOT NULL DEFAULT 0
      );
      CREATE INDEX jobs_tenant ON jobs (tenant_id, seq);
      CREATE INDEX jobs_claimable ON jobs (seq) WHERE status IN ('queued', 'running');
      CREATE INDEX jobs_intervention ON jobs (intervention_id);

      CREATE TABLE job_events (
        job_id     text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq        integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        type       text NOT NULL,
        data       json NOT NULL,
        PRIMARY KEY (job_id, seq)
      );

      CREATE TABLE checkpoints (
        job_id     text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        step       integer NOT NULL,
        state      bytea NOT NULL,
        bytes      bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      );
      ALTER TABLE checkpoints ALTER COLUMN state SET STORAGE EXTERNAL;
    `,
  },
  {
    version: 2,
    name: 'tenant usage',
    sql: `
      -- Usage per tenant and UTC day; recordUsage adds to the counters in place.
      CREATE TABLE tenant_usage (
        tenant_id         text NOT NULL REFERENCES tenants (id),
        day               date NOT NULL,
        requests          bigint NOT NULL DEFAULT 0,
        prompt_tokens     bigint NOT NULL DEFAULT 0,
        completion_tokens bigint NOT NULL DEFAULT 0,
        training_tokens   bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, day)
      );
    `,
  },
];

/** The bookkeeping of migrate(). */
const MIGRATION_SQL = {
  lock: `SELECT pg_advisory_xact_lock($1)`,
  createTable: `
    CREATE TABLE IF NOT EXISTS schema_migrations (
      version    integer PRIMARY KEY,
      name       text NOT NULL,
      applied_at timestamptz NOT NULL DEFAULT now()
    )`,
  applied: `SELECT version FROM schema_migrations`,
  record: `INSERT INTO schema_migrations (version, name) VALUES ($1, $2)`,
} as const;

/** Intervention columns without the file bytes (lists and lookups never read those). */
const IV_COLUMNS = 'id, tenant_id, name, description, source, config, version, bytes, sha256, created_at, updated_at';
const JOB_COLUMNS = `id, tenant_id, status, spec, progress, error, intervention_id, attempts, cancel_requested,
                     created_at, started_at, finished_at, lease_expires_at`;
const FILE_COLUMNS = 'id, tenant_id, filename, purpose, bytes, created_at';
/** The lease-holder guard shared by every worker write: the worker named holds an unexpired lease. */
const LEASE_HELD = `status = 'running' AND lease_worker = $2 AND lease_expires_at > now()`;

/**
 * Every statement the store runs. Paged lists come in pairs: the cursor query takes
 * ($1 = after id, $2... = scope) and the page query ($1 = after seq, $2 = limit, $3... = scope).
 */
const SQL = {
  notify: `SELECT pg_notify($1, $2)`,

  // tenants and keys
  insertTenant: `INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING id, name, created_at`,
  tenantById: `SELECT id, name, created_at FROM tenants WHERE id = $1`,
  tenantCursor: `SELECT seq FROM tenants WHERE id = $1`,
  tenantPage: `SELECT id, name, created_at FROM tenants WHERE seq > $1 ORDER BY seq LIMIT $2`,
  insertKey: `
    INSERT INTO api_keys (id, tenant_id, secret_hash) VALUES ($1, $2, $3)
    RETURNING id, tenant_id, created_at, revoked_at`,
  liveKeyByHash: `
    SELECT k.id, k.tenant_id, k.created_at, k.revoked_at, t.name AS tenant_name, t.created_at AS tenant_created_at
    FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
    WHERE k.secret_hash = $1 AND k.revoked_at IS NULL`,
  revokeKey: `UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL`,

  // interventions. "Visible to $tenant" is (tenant_id = $t OR tenant_id IS NULL): with a null
  // $t the first half is never true, leaving the shared rows only. "Owned by $tenant" is
  // IS NOT DISTINCT FROM, which matches NULL to NULL (an administrator's shared rows).
  insertIntervention: `
    INSERT INTO interventions (id, tenant_id, name, description, source, config, bytes, sha256, config_file, weights_file)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    RETURNING ${IV_COLUMNS}`,
  replaceIntervention: `
    UPDATE interventions
    SET name = $3, description = $4, source = $5, config = $6, version = version + 1, bytes = $7, sha256 = $8,
        config_file = $9, weights_file = $10, updated_at = now()
    WHERE id = $1 AND tenant_id IS NOT DISTINCT FROM $2
    RETURNING ${IV_COLUMNS}`,
  // An id match first, then the tenant's own name, then a shared name.
  findIntervention: `
    SELECT ${IV_COLUMNS} FROM interventions
    WHERE (tenant_id = $1 OR tenant_id IS NULL) AND (id = $2 OR name = $2)
    ORDER BY id = $2 DESC, tenant_id IS NULL ASC
    LIMIT 1`,
  interventionFiles: `SELECT config_file, weights_file FROM interventions WHERE id = $1`,
  interventionCursor: `SELECT seq FROM interventions WHERE id = $1 AND (tenant_id = $2 OR tenant_id IS NULL)`,
  interventionPage: `
    SELECT ${IV_COLUMNS} FROM interventions
    WHERE (tenant_id = $3 OR tenant_id IS NULL) AND seq > $1
    ORDER BY seq LIMIT $2`,
  deleteIntervention: `DELETE FROM interventions WHERE id = $1 AND tenant_id IS NOT DISTINCT FROM $2 RETURNING id`,
  usage: `
    SELECT count(*) AS interventions, coalesce(sum(bytes), 0)::bigint AS bytes
    FROM interventions WHERE tenant_id = $1`,

  // usage accounting. The tenants of a batch that exist, locked FOR KEY SHARE (what a foreign
  // key check takes) until the commit: a concurrent delete of one waits, or has happened and
  // the tenant is not returned, so the upsert never meets a foreign-key violation.
  lockTenants: `SELECT id FROM tenants WHERE id = ANY($1::text[]) FOR KEY SHARE`,
  // One statement for the batch, rows in the (sorted) order given: concurrent batches take their
  // row locks in the same order. Arrays: $1 tenant ids, $2 days, $3..$6 counters; $7 the tenants
  // to keep.
  addUsage: `
    INSERT INTO tenant_usage AS u (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens)
    SELECT e.tenant_id, e.day, e.requests, e.prompt_tokens, e.completion_tokens, e.training_tokens
    FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) WITH ORDINALITY
         AS e (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens, n)
    WHERE e.tenant_id = ANY($7::text[])
    ORDER BY e.n
    ON CONFLICT (tenant_id, day) DO UPDATE
    SET requests = u.requests + excluded.requests,
        prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = u.completion_tokens + excluded.completion_tokens,
        training_tokens = u.training_tokens + excluded.training_tokens`,
  usageDays: `
    SELECT to_char(day, 'YYYY-MM-DD') AS day, requests, prompt_tokens, completion_tokens, training_tokens
    FROM tenant_usage
    WHERE tenant_id = $1 AND day BETWEEN $2::date AND $3::date
    ORDER BY tenant_usage.day`,

  // training data files
  insertFile: `
    INSERT INTO files (id, tenant_id, filename, purpose, bytes, data) VALUES ($1, $2, $3, $4, $5, $6)
    RETURNING ${FILE_COLUMNS}`,
  fileById: `SELECT ${FILE_COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2`,
  fileData: `SELECT data FROM files WHERE id = $1 AND tenant_id = $2`,
  fileCursor: `SELECT seq FROM files WHERE id = $1 AND tenant_id = $2`,
  filePage: `SELECT ${FILE_COLUMNS} FROM files WHERE tenant_id = $3 AND seq > $1 ORDER BY seq LIMIT $2`,
  deleteFile: `DELETE FROM files WHERE id = $1 AND tenant_id = $2`,

  // jobs
  insertJob: `INSERT INTO jobs (id, tenant_id, status, spec) VALUES ($1, $2, 'queued', $3) RETURNING ${JOB_COLUMNS}`,
  jobById: `SELECT ${JOB_COLUMNS} FROM jobs WHERE id = $1`,
  // A null tenant is the worker or an administrator: any job.
  scopedJob: `SELECT ${JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)`,
  lockScopedJob: `SELECT status FROM jobs WHERE id = $1 AND tenant_id = $2 FOR NO KEY UPDATE`,
  jobCursor: `SELECT seq FROM jobs WHERE id = $1 AND tenant_id = $2`,
  jobPage: `SELECT ${JOB_COLUMNS} FROM jobs WHERE tenant_id = $3 AND seq > $1 ORDER BY seq LIMIT $2`,
  // SKIP LOCKED: a row another claimer (or a cancel) holds is passed over, not waited for.
  nextClaimable: `
    SELECT ${JOB_COLUMNS} FROM jobs
    WHERE status IN ('queued', 'running') AND (status = 'queued' OR lease_expires_at <= now())
    ORDER BY seq
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED`,
  claimJob: `
    UPDATE jobs
    SET status = 'running', attempts = attempts + 1, started_at = coalesce(started_at, now()),
        lease_worker = $2, lease_expires_at = now() + $3 * interval '1 millisecond'
    WHERE id = $1
    RETURNING ${JOB_COLUMNS}`,
  // Ends a job whatever holds it (claim-time give-ups, cancelling a queued job).
  endJob: `
    UPDATE jobs
    SET status = $2, error = $3, finished_at = now(), lease_worker = NULL, lease_expires_at = NULL
    WHERE id = $1`,
  requestCancel: `UPDATE jobs SET cancel_requested = true WHERE id = $1`,
  renewLease: `UPDATE jobs SET lease_expires_at = now() + $3 * interval '1 millisecond' WHERE id = $1 AND ${LEASE_HELD}`,
  updateProgress: `UPDATE jobs SET progress = $3 WHERE id = $1 AND ${LEASE_HELD}`,
  finishJob: `
    UPDATE jobs
    SET status = $3, error = $4, intervention_id = $5, finished_at = now(), lease_worker = NULL, lease_expires_at = NULL
    WHERE id = $1 AND ${LEASE_HELD}`,
  // Locks the row so the lease can't expire into another worker's hands before the commit.
  holdLease: `SELECT 1 FROM jobs WHERE id = $1 AND ${LEASE_HELD} FOR NO KEY UPDATE`,
  insertEvent: `
    WITH next AS (UPDATE jobs SET event_seq = event_seq + 1 WHERE id = $1 RETURNING id, event_seq)
    INSERT INTO job_events (job_id, seq, type, data)
    SELECT id, event_seq, $2, $3 FROM next
    RETURNING job_id, seq, created_at, type, data`,
  eventsAfter: `
    SELECT job_id, seq, created_at, type, data FROM job_events
    WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`,
  checkpointByJob: `SELECT step, state FROM checkpoints WHERE job_id = $1`,
  upsertCheckpoint: `
    INSERT INTO checkpoints (job_id, step, state, bytes) VALUES ($1, $2, $3, $4)
    ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, state = excluded.state, bytes = excluded.bytes,
                                       created_at = excluded.created_at`,
} as const;

// ---------------------------------------------------------------------------------------------
// Rows as pg returns them (rows.ts maps them): timestamptz as Date, json parsed, boolean as
// boolean (and bytea as Buffer, int8 as number); plus the lease expiry claimJob reads.
// ---------------------------------------------------------------------------------------------

type Columns = { time: Date; json: unknown; flag: boolean };

type TenantRow = Rows.TenantRow<Columns>;
type KeyRow = Rows.KeyRow<Columns>;
type InterventionRow = Rows.InterventionRow<Columns>;
type FileRow = Rows.FileRow<Columns>;
type EventRow = Rows.EventRow<Columns>;

interface JobRow extends Rows.JobRow<Columns> {
  lease_expires_at: Date | null;
}

const { toTenant, toKey, toKeyWithTenant, toIntervention, toFile, toJob, toEvent } = rowMappers<Columns>({
  time: (date) => date.toISOString(),
  json: (value) => value,
  flag: (flag) => flag,
});

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/** A bytea parameter: pg sends Buffers as binary, without copying the bytes. */
const bytea = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/** A bytea result as a plain Uint8Array view, like the SQLite store returns. */
const bytesOf = (b: Buffer): Uint8Array => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

function sqlState(e: unknown): string | undefined {
  return e instanceof DatabaseError ? e.code : undefined;
}

const UNIQUE_VIOLATION = '23505';
const FOREIGN_KEY_VIOLATION = '23503';

/** Turns a constraint violation into the ReftError the caller should see; anything else is returned as is. */
function translate(e: unknown, byState: Partial<Record<string, () => ReftError>>): unknown {
  const state = sqlState(e);
  const make = state === undefined ? undefined : byState[state];
  return make ? make() : e;
}

// ---------------------------------------------------------------------------------------------
// Errors: which ones mean "the database is not reachable right now".
// ---------------------------------------------------------------------------------------------

/** Socket-level failures to reach or keep a connection to the server. */
const NETWORK_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH',
  'ENOTFOUND', 'EAI_AGAIN',
]);

/**
 * SQLSTATEs of a server that is going away, starting, out of resources or too slow: class 08
 * (connection exception), 53 (insufficient resources, e.g. too many connections), 57P01-57P03
 * (admin/crash shutdown, cannot connect now), 57014 (statement timeout), and a deadlock or
 * serialization failure that outlived its retries.
 */
function transientState(state: string): boolean {
  return /^(08|53)/.test(state) || ['57P01', '57P02', '57P03', '57014', '40001', '40P01'].includes(state);
}

/** pg's own messages for connections that died or could not be made in time. */
const CONNECTION_MESSAGE =
  /Connection terminated|connection timeout|timeout exceeded when trying to connect|not queryable|Query read timeout/i;

function isUnavailable(e: unknown): boolean {
  if (!(e instanceof Error)) return false;
  const state = sqlState(e);
  if (state !== undefined) return transientState(state);
  const code = (e as NodeJS.ErrnoException).code;
  if (code !== undefined && NETWORK_CODES.has(code)) return true;
  // Node reports a failed connect to every address of a host ('localhost': ::1 and 127.0.0.1) as one AggregateError.
  if (e instanceof AggregateError && e.errors.some(isUnavailable)) return true;
  return CONNECTION_MESSAGE.test(e.message);
}

/** The error a caller sees: an unreachable database becomes 'unavailable' (503 + Retry-After). */
function toStoreError(e: unknown): unknown {
  if (e instanceof ReftError || !isUnavailable(e)) return e;
  return new ReftError('unavailable', `the database is unavailable: ${(e as Error).message}`, undefined, RETRY_AFTER_SECONDS);
}

const retryable = (e: unknown): boolean => ['40001', '40P01'].includes(sqlState(e) ?? '');

// ---------------------------------------------------------------------------------------------
// Statements on a pool (each its own transaction) or on one client inside a transaction.
// ---------------------------------------------------------------------------------------------

type Exec = (sql: string, params: unknown[]) => Promise<QueryResult>;

class Db {
  constructor(private readonly exec: Exec) {}

  async all<R extends QueryResultRow>(sql: string, params: unknown[] = []): Promise<R[]> {
    return (await this.exec(sql, params)).rows as R[];
  }

  async one<R extends QueryResultRow>(sql: string, params: unknown[] = []): Promise<R | undefined> {
    return (await this.all<R>(sql, params))[0];
  }

  /** The number of rows a write changed. */
  async count(sql: string, params: unknown[] = []): Promise<number> {
    return (await this.exec(sql, params)).rowCount ?? 0;
  }
}

/** Runs `attempt` again while it fails with a deadlock or serialization failure. */
async function withRetries<T>(attempt: () => Promise<T>): Promise<T> {
  for (let n = 1; ; n++) {
    try {
      return await attempt();
    } catch (e) {
      if (n >= TRANSACTION_ATTEMPTS || !retryable(e)) throw e;
    }
  }
}

/**
 * BEGIN, body, COMMIT on one pool client; ROLLBACK on any error. The client gets an 'error'
 * handler while it is checked out: a connection dying between two statements would otherwise be
 * an unhandled 'error' event, which ends the process. A client whose connection broke is
 * destroyed instead of going back to the pool.
 */
async function inTransaction<T>(pool: Pool, body: (db: Db) => Promise<T>): Promise<T> {
  const client: PoolClient = await pool.connect();
  let broken: Error | undefined;
  const onError = (e: Error) => {
    broken = e;
  };
  client.on('error', onError);
  try {
    await client.query('BEGIN');
    const result = await body(new Db((sql, params) => client.query(sql, params)));
    await client.query('COMMIT');
    return result;
  } catch (e) {
    await client.query('ROLLBACK').catch((rollbackError: Error) => {
      broken ??= rollbackError;
    });
    throw e;
  } finally {
    client.off('error', onError);
    client.release(broken);
  }
}

/**
 * Applies the migrations this database lacks, in order, in one transaction holding an advisory
 * lock: a second process starting at the same time waits for the lock, then finds them applied.
 */
async function migrate(pool: Pool, migrations: readonly Migration[]): Promise<void> {
  await inTransaction(pool, async (db) => {
    // First, before anything else: concurrent CREATE TABLE IF NOT EXISTS can itself collide.
    await db.all(MIGRATION_SQL.lock, [MIGRATION_LOCK_KEY]);
    await db.all(MIGRATION_SQL.createTable);
    const applied = new Set((await db.all<{ version: number }>(MIGRATION_SQL.applied)).map((r) => r.version));
    for (const m of pendingMigrations(migrations, applied, 'the database')) {
      await db.all(m.sql);
      await db.all(MIGRATION_SQL.record, [m.version, m.name]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The LISTEN connection
// ---------------------------------------------------------------------------------------------

interface ListenerEvents {
  notification(msg: Notification): void;
  /** The connection came back after a loss (notifications sent meanwhile are lost). */
  reconnected(): void;
  /** The connection was lost (reported once per outage). */
  lost(err: Error): void;
}

/**
 * One dedicated client that LISTENs on the store's channels (a pooled connection can't: LISTEN
 * is per session). It reconnects by itself, with capped exponential backoff, whenever the
 * connection ends or a periodic ping fails, and LISTENs again.
 */
class Listener {
  private client: Client | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private failures = 0;
  private started = false;
  private closed = false;

  constructor(
    private readonly config: ClientConfig,
    private readonly channels: readonly string[],
    private readonly events: ListenerEvents,
  ) {}

  /** Connects once; throws if that fails (the store then fails to open). */
  async start(): Promise<void> {
    await this.connect();
    this.started = true;
    this.pingTimer = setInterval(() => void this.ping(), LISTENER_PING_MS);
    this.pingTimer.unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.pingTimer) clearInterval(this.pingTimer);
    const client = this.client;
    this.client = null;
    await client?.end().catch(() => {});
  }

  private async connect(): Promise<void> {
    const client = new Client(this.config);
    this.client = client;
    client.on('error', (e) => this.lose(client, e));
    client.on('end', () => this.lose(client, new Error('the listener connection ended')));
    // A client we already gave up on (a ping timed out but it lives on) must not deliver twice.
    client.on('notification', (msg) => {
      if (client === this.client) this.events.notification(msg);
    });
    try {
      await client.connect();
      // Channel names are constants of this module, not input: safe to splice in.
      for (const channel of this.channels) await client.query(`LISTEN ${channel}`);
    } catch (e) {
      this.lose(client, e as Error);
      throw e;
    }
    if (this.closed) await client.end().catch(() => {});
  }

  /** Drops a failed client (once) and schedules the next connect. */
  private lose(client: Client, err: Error): void {
    if (client !== this.client) return;
    this.client = null;
    client.end().catch(() => {});
    if (!this.started || this.closed) return;
    if (this.failures === 0) this.events.lost(err);
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.reconnectTimer || this.closed) return;
    const cap = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** this.failures);
    this.failures++;
    // Jitter: processes that lost the same server don't all come back in the same millisecond.
    const delay = cap / 2 + Math.random() * (cap / 2);
    this.reconnectTimer = setTimeout(() => void this.reconnect(), delay);
    // Reconnecting is background upkeep: it alone must not keep a process alive.
    this.reconnectTimer.unref();
  }

  private async reconnect(): Promise<void> {
    this.reconnectTimer = null;
    try {
      await this.connect();
    } catch {
      return; // lose() has scheduled the next attempt
    }
    if (this.closed) return;
    this.failures = 0;
    this.events.reconnected();
  }

  /** A dead peer that never sent a reset leaves the socket open but silent: a ping finds out. */
  private async ping(): Promise<void> {
    const client = this.client;
    if (!client) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('the listener connection stopped answering')), LISTENER_PING_TIMEOUT_MS);
    });
    try {
      await Promise.race([client.query('SELECT 1'), timeout]);
    } catch (e) {
      this.lose(client, e as Error);
    } finally {
      clearTimeout(timer);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

export class PostgresStore implements Store {
  private readonly interventionListeners = new Listeners<[id: string]>();
  private readonly jobListeners = new Listeners<[]>();
  /** Backend pids of this store's pool connections: NOTIFYs they send are our own echoes. */
  private readonly ownBackends = new Set<number>();
  private readonly db: Db;
  private listener: Listener | null = null;
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly pool: Pool,
    private readonly log: (message: string) => void,
  ) {
    // Single statements: each is its own transaction; retried on deadlock, errors mapped.
    this.db = new Db(async (sql, params) => {
      try {
        return await withRetries(() => pool.query(sql, params));
      } catch (e) {
        throw toStoreError(e);
      }
    });
    // An idle client whose connection dies (e.g. the server restarts) is reported here, and
    // the pool drops it. Without a handler, the 'error' event would end the process.
    pool.on('error', (err) => this.log(`an idle database connection failed: ${err.message}`));
    pool.on('connect', (client) => {
      const pid = backendPid(client);
      if (pid !== null) this.ownBackends.add(pid);
    });
    pool.on('remove', (client) => {
      const pid = backendPid(client);
      if (pid !== null) setTimeout(() => this.ownBackends.delete(pid), ECHO_GRACE_MS).unref();
    });
  }

  /** Connects, migrates the schema and starts listening; fails (cleaning up) if any step does. */
  static async open(url: string, options: PostgresStoreOptions = {}): Promise<PostgresStore> {
    const log = options.log ?? ((message: string) => process.emitWarning(`postgres store: ${message}`));
    const config = clientConfig(url, options);
    const pool = new Pool({ ...config, max: options.maxConnections ?? 10, idleTimeoutMillis: IDLE_TIMEOUT_MS });
    const store = new PostgresStore(pool, log);
    try {
      await migrate(pool, migrationsUpTo(MIGRATIONS, options.schemaVersion));
      const listener = new Listener(config, [CHANNELS.interventionChanged, CHANNELS.jobQueued], {
        notification: (msg) => store.onNotification(msg),
        reconnected: () => {
          log('the LISTEN connection is back');
          store.jobListeners.emit(); // a job queued while we were deaf would otherwise wait for a poll
        },
        lost: (err) => log(`the LISTEN connection was lost (${err.message}); reconnecting`),
      });
      await listener.start();
      store.listener = listener;
      return store;
    } catch (e) {
      await pool.end().catch(() => {});
      throw toStoreError(e);
    }
  }

  // --- tenants and keys ---------------------------------------------------------------------

  async createTenant(name: string): Promise<Tenant> {
    return toTenant((await this.db.one<TenantRow>(SQL.insertTenant, [newId('tenant'), name]))!);
  }

  async getTenant(id: string): Promise<Tenant | null> {
    const row = await this.db.one<TenantRow>(SQL.tenantById, [id]);
    return row ? toTenant(row) : null;
  }

  async listTenants(page: PageRequest): Promise<Page<Tenant>> {
    return this.page(SQL.tenantCursor, SQL.tenantPage, [], page, toTenant);
  }

  async createApiKey(tenantId: string, secretHash: string): Promise<ApiKey> {
    try {
      return toKey((await this.db.one<KeyRow>(SQL.insertKey, [newId('key'), tenantId, secretHash]))!);
    } catch (e) {
      throw translate(e, {
        [FOREIGN_KEY_VIOLATION]: () => noTenant(tenantId),
        [UNIQUE_VIOLATION]: keySecretTaken,
      });
    }
  }

  async findApiKey(secretHash: string): Promise<{ key: ApiKey; tenant: Tenant } | null> {
    const row = await this.db.one<Rows.KeyWithTenantRow<Columns>>(SQL.liveKeyByHash, [secretHash]);
    return row ? toKeyWithTenant(row) : null;
  }

  async revokeApiKey(id: string): Promise<boolean> {
    return (await this.db.count(SQL.revokeKey, [id])) === 1;
  }

  // --- interventions ------------------------------------------------------------------------

  async putIntervention(iv: NewIntervention, replaceId?: string): Promise<InterventionMeta> {
    const record = interventionRecord(iv, replaceId);
    const { id } = record;
    const params = [
      id,
      record.tenantId,
      record.name,
      record.description,
      record.source,
      record.config,
      record.bytes,
      record.sha256,
      bytea(iv.files.config),
      bytea(iv.files.weights),
    ];
    let row: InterventionRow;
    try {
      row = await this.transaction(async (db) => {
        if (replaceId === undefined) return (await db.one<InterventionRow>(SQL.insertIntervention, params))!;
        const replaced = await db.one<InterventionRow>(SQL.replaceIntervention, params);
        if (!replaced) throw noInterventionToReplace(replaceId);
        await db.all(SQL.notify, [CHANNELS.interventionChanged, id]);
        return replaced;
      });
    } catch (e) {
      throw translate(e, {
        [UNIQUE_VIOLATION]: () => interventionNameTaken(iv.name),
        [FOREIGN_KEY_VIOLATION]: () => noTenant(iv.tenantId),
      });
    }
    if (replaceId !== undefined) this.interventionListeners.emit(id);
    return toIntervention(row);
  }

  async findIntervention(tenantId: string | null, idOrName: string): Promise<InterventionMeta | null> {
    const row = await this.db.one<InterventionRow>(SQL.findIntervention, [tenantId, idOrName]);
    return row ? toIntervention(row) : null;
  }

  async listInterventions(tenantId: string | null, page: PageRequest): Promise<Page<InterventionMeta>> {
    return this.page(SQL.interventionCursor, SQL.interventionPage, [tenantId], page, toIntervention);
  }

  async readInterventionFiles(id: string): Promise<InterventionFiles | null> {
    // One statement reads both columns of one row version: never half of a replace.
    const row = await this.db.one<{ config_file: Buffer; weights_file: Buffer }>(SQL.interventionFiles, [id]);
    return row ? { config: bytesOf(row.config_file), weights: bytesOf(row.weights_file) } : null;
  }

  async deleteIntervention(tenantId: string | null, id: string): Promise<boolean> {
    const deleted = await this.transaction(async (db) => {
      if (!(await db.one(SQL.deleteIntervention, [id, tenantId]))) return false;
      await db.all(SQL.notify, [CHANNELS.interventionChanged, id]);
      return true;
    });
    if (deleted) this.interventionListeners.emit(id);
    return deleted;
  }

  async usage(tenantId: string): Promise<Usage> {
    return (await this.db.one<Usage>(SQL.usage, [tenantId]))!;
  }

  // --- usage accounting ---------------------------------------------------------------------

  async recordUsage(entries: UsageRecord[]): Promise<void> {
    const rows = usageBatch(entries);
    if (rows.length === 0) return;
    const tenantIds = [...new Set(rows.map((r) => r.tenantId))];
    const column = <K extends keyof UsageRecord>(k: K) => rows.map((r) => r[k]);
    await this.transaction(async (db) => {
      const live = (await db.all<{ id: string }>(SQL.lockTenants, [tenantIds])).map((r) => r.id);
      if (live.length === 0) return;
      await db.count(SQL.addUsage, [
        column('tenantId'),
        column('day'),
        column('requests'),
        column('promptTokens'),
        column('completionTokens'),
        column('trainingTokens'),
        live,
      ]);
    });
  }

  async getUsage(tenantId: string, from: string, to: string): Promise<UsageDay[]> {
    checkUsageRange(from, to);
    return (await this.db.all<UsageRow>(SQL.usageDays, [tenantId, from, to])).map(toUsageDay);
  }

  // --- training data files ------------------------------------------------------------------

  async putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<StoredFile> {
    try {
      const row = await this.db.one<FileRow>(SQL.insertFile, [newId('file'), tenantId, filename, purpose, bytes.byteLength, bytea(bytes)]);
      return toFile(row!);
    } catch (e) {
      throw translate(e, { [FOREIGN_KEY_VIOLATION]: () => noTenant(tenantId) });
    }
  }

  async getFile(tenantId: string, id: string): Promise<StoredFile | null> {
    const row = await this.db.one<FileRow>(SQL.fileById, [id, tenantId]);
    return row ? toFile(row) : null;
  }

  async readFile(tenantId: string, id: string): Promise<Uint8Array | null> {
    const row = await this.db.one<{ data: Buffer }>(SQL.fileData, [id, tenantId]);
    return row ? bytesOf(row.data) : null;
  }

  async listFiles(tenantId: string, page: PageRequest): Promise<Page<StoredFile>> {
    return this.page(SQL.fileCursor, SQL.filePage, [tenantId], page, toFile);
  }

  async deleteFile(tenantId: string, id: string): Promise<boolean> {
    return (await this.db.count(SQL.deleteFile, [id, tenantId])) === 1;
  }

  // --- training jobs ------------------------------------------------------------------------

  async createJob(tenantId: string, spec: unknown): Promise<Job> {
    const id = newId('job');
    let row: JobRow;
    try {
      row = await this.transaction(async (db) => {
        const inserted = (await db.one<JobRow>(SQL.insertJob, [id, tenantId, json(spec)]))!;
        await addEvent(db, id, 'status', queuedEvent());
        await db.all(SQL.notify, [CHANNELS.jobQueued, id]);
        return inserted;
      });
    } catch (e) {
      throw translate(e, { [FOREIGN_KEY_VIOLATION]: () => noTenant(tenantId) });
    }
    this.jobListeners.emit();
    return toJob(row);
  }

  async getJob(tenantId: string | null, id: string): Promise<Job | null> {
    const row = await this.db.one<JobRow>(SQL.scopedJob, [id, tenantId]);
    return row ? toJob(row) : null;
  }

  async listJobs(tenantId: string, page: PageRequest): Promise<Page<Job>> {
    return this.page(SQL.jobCursor, SQL.jobPage, [tenantId], page, toJob);
  }

  async requestCancel(tenantId: string, id: string): Promise<Job | null> {
    return this.transaction(async (db) => {
      // Locked: a claimer skips the row until we commit, so a queued job can't start meanwhile.
      const row = await db.one<{ status: JobStatus }>(SQL.lockScopedJob, [id, tenantId]);
      if (!row) return null;
      if (row.status === 'queued') {
        await db.count(SQL.requestCancel, [id]);
        await endJob(db, id, 'cancelled', null);
      } else if (row.status === 'running') {
        // The worker sees cancelRequested when it next reads the job, and finishes it as cancelled.
        await db.count(SQL.requestCancel, [id]);
      }
      return toJob((await db.one<JobRow>(SQL.jobById, [id]))!);
    });
  }

  async claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: Job; lease: Lease } | null> {
    return this.transaction(async (db) => {
      for (;;) {
        const row = await db.one<JobRow>(SQL.nextClaimable);
        if (!row) return null;
        const end = endInsteadOfClaim({ cancelRequested: row.cancel_requested, attempts: row.attempts }, maxAttempts);
        if (end) {
          await endJob(db, row.id, end.status, end.error);
          continue;
        }
        const claimed = (await db.one<JobRow>(SQL.claimJob, [row.id, workerId, leaseMs]))!;
        await addEvent(db, row.id, 'status', runningEvent(claimed.attempts));
        return { job: toJob(claimed), lease: { jobId: row.id, workerId, expiresAt: claimed.lease_expires_at!.getTime() } };
      }
    });
  }

  async renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean> {
    return (await this.db.count(SQL.renewLease, [jobId, workerId, leaseMs])) === 1;
  }

  async updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean> {
    return (await this.db.count(SQL.updateProgress, [jobId, workerId, json(progress)])) === 1;
  }

  async appendJobEvent(jobId: string, type: string, data: unknown): Promise<JobEvent> {
    const row = await this.db.one<EventRow>(SQL.insertEvent, [jobId, type, json(data)]);
    if (!row) throw noJob(jobId);
    return toEvent(row);
  }

  async listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<JobEvent[]> {
    return (await this.db.all<EventRow>(SQL.eventsAfter, [jobId, afterSeq, clampLimit(limit)])).map(toEvent);
  }

  async saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean> {
    return this.transaction(async (db) => {
      if (!(await db.one(SQL.holdLease, [jobId, workerId]))) return false;
      await db.count(SQL.upsertCheckpoint, [jobId, step, bytea(state), state.byteLength]);
      return true;
    });
  }

  async loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null> {
    const row = await this.db.one<{ step: number; state: Buffer }>(SQL.checkpointByJob, [jobId]);
    return row ? { step: row.step, state: bytesOf(row.state) } : null;
  }

  async finishJob(jobId: string, workerId: string, outcome: JobOutcome): Promise<boolean> {
    const { error, interventionId } = outcomeColumns(outcome);
    try {
      return await this.transaction(async (db) => {
        if ((await db.count(SQL.finishJob, [jobId, workerId, outcome.status, error, interventionId])) !== 1) return false;
        await addEvent(db, jobId, 'status', endedEvent(outcome.status, error, interventionId));
        return true;
      });
    } catch (e) {
      throw translate(e, { [FOREIGN_KEY_VIOLATION]: () => noIntervention(interventionId) });
    }
  }

  // --- listeners and lifecycle --------------------------------------------------------------

  onInterventionChanged(listener: (id: string) => void): () => void {
    return this.interventionListeners.add(listener);
  }

  onJobQueued(listener: () => void): () => void {
    return this.jobListeners.add(listener);
  }

  async close(): Promise<void> {
    this.closing ??= (async () => {
      await this.listener?.close();
      await this.pool.end();
    })();
    return this.closing;
  }

  // --- internals ----------------------------------------------------------------------------

  private onNotification(msg: Notification): void {
    // Our own write already fired our listeners when it committed.
    if (this.ownBackends.has(msg.processId)) return;
    if (msg.channel === CHANNELS.interventionChanged && msg.payload) this.interventionListeners.emit(msg.payload);
    else if (msg.channel === CHANNELS.jobQueued) this.jobListeners.emit();
  }

  /** A write transaction, retried on deadlock or serialization failure; errors mapped for callers. */
  private async transaction<T>(body: (db: Db) => Promise<T>): Promise<T> {
    try {
      return await withRetries(() => inTransaction(this.pool, body));
    } catch (e) {
      throw toStoreError(e);
    }
  }

  private async page<R extends QueryResultRow & { id: string }, T>(
    cursorSql: string,
    pageSql: string,
    scope: unknown[],
    req: PageRequest,
    map: (row: R) => T,
  ): Promise<Page<T>> {
    const limit = clampLimit(req.limit);
    const cursor = req.after === undefined ? undefined : await this.db.one<{ seq: number }>(cursorSql, [req.after, ...scope]);
    const rows = await this.db.all<R>(pageSql, [seqAfter(req.after, cursor), limit + 1, ...scope]);
    return pageOf(rows, limit, map);
  }
}

/** Appends an event to a job's stream inside the caller's transaction. */
async function addEvent(db: Db, jobId: string, type: string, data: unknown): Promise<JobEvent> {
  return toEvent((await db.one<EventRow>(SQL.insertEvent, [jobId, type, json(data)]))!);
}

/** Ends a job regardless of its lease (queued cancel, claim-time give-up), with its status event. */
async function endJob(db: Db, id: string, status: 'cancelled' | 'failed', error: string | null): Promise<void> {
  await db.count(SQL.endJob, [id, status, error]);
  await addEvent(db, id, 'status', endedEvent(status, error));
}

/** The server process serving this client (pg knows it from the startup handshake, but doesn't type it). */
function backendPid(client: unknown): number | null {
  return (client as { processID?: number | null }).processID ?? null;
}

/** Settings every connection of the store gets, the pool's and the listener's. */
function clientConfig(url: string, options: PostgresStoreOptions): PoolConfig {
  // int8 (counts, sums, sequence numbers, byte sizes) as a JS number: all stay far below 2^53.
  const types = new TypeOverrides();
  types.setTypeParser(20, 'text', Number);
  return {
    connectionString: url,
    types,
    application_name: 'reft-server',
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    statement_timeout: options.statementTimeoutMs ?? DEFAULT_STATEMENT_TIMEOUT_MS,
    idle_in_transaction_session_timeout: IDLE_IN_TRANSACTION_TIMEOUT_MS,
    keepAlive: true,
  };
}
