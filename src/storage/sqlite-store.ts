import Database from 'better-sqlite3';
import { CompiledQuery, Kysely, SqliteDialect, SqliteDriver, sql, type Driver, type SqliteDialectConfig } from 'kysely';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { BLOB_FILE_COLUMNS, BlobFiles, type FaultPoint } from './blob-files.ts';
import { EVENT_COLUMNS, migrate, migrations, migrationsUpTo, type EventRow, type SqlTypes, type Tables } from './schema.ts';
import type { Dialect } from './dialect.ts';
import { SqlStore } from './sql-store.ts';
import type { Store } from './store.ts';

export type { FaultPoint } from './blob-files.ts';

/**
 * The embedded dialect: one SQLite database (<dataDir>/reft.db, WAL mode, so a training worker
 * process can share it) plus blob files under <dataDir>/blobs/ (blob-files.ts). Particular to it:
 * - Time is the writing process's clock: timestamps are its ISO text, lease expiry its epoch ms.
 * - Listeners fire only in the writing process (SQLite has no cross-process notifications):
 *   workers poll `claimJob`.
 * - Every write transaction is BEGIN IMMEDIATE: it takes the write lock at once, so what it
 *   reads stays true until it commits (this is the claim's lock), and it waits out the busy
 *   timeout for another process's lock instead of failing at once with SQLITE_BUSY.
 * - better-sqlite3 is synchronous: a busy database can make a call wait up to BUSY_TIMEOUT_MS
 *   (blob bytes are written and fsynced before the write transaction starts).
 */

/** How long a statement waits for another connection's write lock before failing. */
const BUSY_TIMEOUT_MS = 10_000;

export interface SqliteStoreOptions {
  /** Called at each FaultPoint of a blob write; a test can kill the process there. */
  faultHook?: (point: FaultPoint) => void;
  /** Migrate only up to this schema version (default: all): only tests of an upgrade set it. */
  schemaVersion?: number;
}

const TYPES: SqlTypes = {
  // SQLite's rowid: kept by VACUUM.
  seq: 'INTEGER PRIMARY KEY',
  time: 'TEXT',
  nowDefault: '',
  json: 'TEXT',
  flag: 'INTEGER',
  falseValue: '0',
  big: 'INTEGER',
  blob: 'TEXT',
  lease: 'INTEGER',
  // YYYY-MM-DD text sorts as the dates do.
  day: `TEXT NOT NULL CHECK (day GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]')`,
  nameKey: `(ifnull(tenant_id, ''), name)`,
  afterInitial: '',
  usageTable: ' WITHOUT ROWID',
  eventSeq: '',
};

const MIGRATIONS = migrations(TYPES, BLOB_FILE_COLUMNS);

/** Kysely's SQLite dialect, with BEGIN IMMEDIATE for its transactions. */
class ImmediateDialect extends SqliteDialect {
  constructor(private readonly config: SqliteDialectConfig) {
    super(config);
  }

  override createDriver(): Driver {
    const driver = new SqliteDriver(this.config);
    driver.beginTransaction = async (connection) => void (await connection.executeQuery(CompiledQuery.raw('begin immediate')));
    return driver;
  }
}

/** Opens (creating if needed) the store under dataDir: migrates the schema, sweeps crash leftovers. */
export async function openSqliteStore(dataDir: string, options: SqliteStoreOptions = {}): Promise<Store> {
  const blobs = new BlobFiles(join(dataDir, 'blobs'), options.faultHook);
  mkdirSync(blobs.where, { recursive: true });
  const raw = new Database(join(dataDir, 'reft.db'), { timeout: BUSY_TIMEOUT_MS });
  const db = new Kysely<Tables>({ dialect: new ImmediateDialect({ database: raw }) });
  try {
    configure(raw);
    await migrate(db, migrationsUpTo(MIGRATIONS, options.schemaVersion), {
      database: raw.name,
      time: 'TEXT NOT NULL',
      lock: async () => {},
      exec: async (_, text) => void raw.exec(text),
    });
    sweep(raw, blobs);
  } catch (e) {
    await db.destroy().catch(() => {});
    if (raw.open) raw.close();
    throw e;
  }
  const dialect: Dialect = {
    db,
    blobs,
    now: () => new Date().toISOString(),
    leaseNow: () => Date.now(),
    leaseUntil: (ms) => Date.now() + ms,
    flag: (value) => (value ? 1 : 0),
    lock: (query) => query,
    addEvent: async (tx, jobId, type, data, at) => {
      const { rows } = await sql<EventRow>`
        INSERT INTO job_events (job_id, seq, created_at, type, data)
        SELECT id, (SELECT ifnull(max(seq), 0) + 1 FROM job_events WHERE job_id = ${jobId}), ${at}, ${type}, ${data}
        FROM jobs WHERE id = ${jobId}
        RETURNING ${EVENT_COLUMNS}`.execute(tx);
      return rows[0];
    },
    // Under the write lock (IMMEDIATE), so writers in other processes never lose increments. The
    // WHERE skips unknown tenants (and settles SQLite's INSERT ... SELECT ... ON CONFLICT ambiguity).
    addUsage: (db, rows) =>
      db.transaction().execute(async (tx) => {
        for (const r of rows) {
          await sql`
          INSERT INTO tenant_usage (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens)
          SELECT ${r.tenantId}, ${r.day}, ${r.requests}, ${r.promptTokens}, ${r.completionTokens}, ${r.trainingTokens}
          WHERE EXISTS (SELECT 1 FROM tenants WHERE id = ${r.tenantId})
          ON CONFLICT (tenant_id, day) DO UPDATE
          SET requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
              completion_tokens = completion_tokens + excluded.completion_tokens,
              training_tokens = training_tokens + excluded.training_tokens`.execute(tx);
        }
      }),
    notify: async () => {},
    violation: (e) => {
      const code = e instanceof Database.SqliteError ? e.code : undefined;
      return code === 'SQLITE_CONSTRAINT_UNIQUE' ? 'unique' : code === 'SQLITE_CONSTRAINT_FOREIGNKEY' ? 'foreignKey' : undefined;
    },
    retryable: () => false,
    toStoreError: (e) => e,
    close: () => db.destroy(),
  };
  return new SqlStore(dialect);
}

function configure(db: Database.Database): void {
  // WAL lets readers (the server) go on while a writer (the worker) commits.
  const mode = db.pragma('journal_mode = WAL', { simple: true });
  if (mode !== 'wal') throw new Error(`SQLite could not use WAL mode for ${db.name} (got "${mode}")`);
  // FULL, not NORMAL: blobs are deleted right after a commit, so a commit must never be lost.
  db.pragma('synchronous = FULL');
  db.pragma('foreign_keys = ON');
}

/** Removes the blob files crashes left behind, holding the write lock (no rename is between its commit). */
function sweep(db: Database.Database, blobs: BlobFiles): void {
  const { config, weights, file, checkpoint } = blobs.columns;
  const named = db.prepare(`
    SELECT ${config} AS name FROM interventions UNION ALL SELECT ${weights} FROM interventions UNION ALL
    SELECT ${file} FROM files UNION ALL SELECT ${checkpoint} FROM checkpoints`);
  db.transaction(() => blobs.sweep(new Set((named.all() as { name: string }[]).map((r) => r.name)))).immediate();
}
