import Database from 'better-sqlite3';
import { CamelCasePlugin, CompiledQuery, Kysely, SqliteDialect, SqliteDriver, sql, type Driver, type SqliteDialectConfig } from 'kysely';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { BLOB_FILE_COLUMNS, BlobFiles, type FaultPoint } from './blob-files.ts';
import { migrate, type SqlTypes, type Tables } from './schema.ts';
import { SqlStore } from './sql-store.ts';
import type { Store } from './store.ts';

export type { FaultPoint } from './blob-files.ts';

/**
 * The embedded dialect: one SQLite database (<dataDir>/reft.db, WAL mode, so a training worker
 * process can share it) plus blob files under <dataDir>/blobs/ (blob-files.ts). Time is the
 * writing process's clock. Listeners fire only in the writing process: workers poll `claimJob`.
 * Every write transaction is BEGIN IMMEDIATE: it holds the write lock from its first read (this
 * is the claim's lock), waiting out another process's lock instead of failing with SQLITE_BUSY.
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
  seq: 'INTEGER PRIMARY KEY', // SQLite's rowid: kept by VACUUM
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
  // SQLite can't alter a foreign key: deleteTenant deletes what a tenant owns itself.
  cascade: '',
  migrationLock: '', // BEGIN IMMEDIATE already keeps other processes out
};

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
  const db = new Kysely<Tables>({ dialect: new ImmediateDialect({ database: raw }), plugins: [new CamelCasePlugin()] });
  try {
    configure(raw);
    const exec = async (_: unknown, text: string) => void raw.exec(text);
    await migrate(db, { types: TYPES, blobs: BLOB_FILE_COLUMNS, database: raw.name, exec }, options.schemaVersion);
    sweep(raw, blobs);
  } catch (e) {
    await db.destroy().catch(() => {});
    if (raw.open) raw.close();
    throw e;
  }
  return new SqlStore({
    db,
    blobs,
    now: () => new Date().toISOString(),
    leaseAt: (ms) => Date.now() + ms,
    lock: (query) => query,
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
  });
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
