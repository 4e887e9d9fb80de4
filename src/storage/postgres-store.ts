import { randomBytes } from 'node:crypto';
import { Kysely, PostgresDialect, PostgresDriver, sql, type DatabaseConnection, type Driver } from 'kysely';
import { DatabaseError, Pool, TypeOverrides, type PoolConfig } from 'pg';
import { ReftError, databaseUnavailable } from '../errors.ts';
import { Listener } from './pg-listener.ts';
import { migrate, migrations, type BlobColumns, type SqlTypes, type Tables } from './schema.ts';
import { SqlStore } from './sql-store.ts';
import type { AnySelect } from './dialect.ts';
import type { Store } from './store.ts';

/**
 * The PostgreSQL dialect: everything, file bytes included (bytea), lives in one database that
 * servers and workers on several hosts share. Time is the database clock, so hosts with skewed
 * clocks agree on leases. A write that deletes or replaces an intervention, or queues a job,
 * sends NOTIFY, heard on every process's LISTEN connection (pg-listener.ts; notifications sent
 * while it is down are lost, so job listeners are woken when it is back). An unreachable
 * database fails calls fast with 'unavailable' (503 + Retry-After); the pool and the listener
 * reconnect by themselves. Claims take rows FOR NO KEY UPDATE SKIP LOCKED (which doesn't block
 * the foreign key checks of event inserts): claimers never wait on each other.
 */

export interface PostgresStoreOptions {
  /** Connections this process's pool may open (default 10). */
  maxConnections?: number;
  /** Server-side limit for one statement, in ms (default 30 s). */
  statementTimeoutMs?: number;
  /** Told about trouble no caller sees, and recovery from it (default: a process warning). */
  log?: (message: string) => void;
  /** Migrate only up to this schema version (default: all): only tests of an upgrade set it. */
  schemaVersion?: number;
}

/** An unreachable database must fail a request fast. */
const CONNECT_TIMEOUT_MS = 2_000;
/** A session stuck inside a transaction (a hung process) is ended by the server after this. */
const IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000;
const RETRY_AFTER_SECONDS = 2;
/** pg_advisory_xact_lock key serialising migrations across processes ('reft' in ASCII). */
const MIGRATION_LOCK_KEY = 0x72656674;

/** NOTIFY channels (per database, so stores on different databases never hear each other). */
const CHANNELS = { interventionChanged: 'reft_intervention_changed', jobQueued: 'reft_job_queued' } as const;

const COLUMNS: BlobColumns = { config: 'config_file', weights: 'weights_file', file: 'data', checkpoint: 'state' };

const TYPES: SqlTypes = {
  seq: 'bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY',
  time: 'timestamptz',
  nowDefault: ' DEFAULT now()',
  json: 'json', // not jsonb: the store only hands documents back, as written
  flag: 'boolean',
  falseValue: 'false',
  big: 'bigint',
  blob: 'bytea',
  lease: 'timestamptz',
  day: 'date NOT NULL',
  nameKey: `(name, (coalesce(tenant_id, '')))`, // name first: it also serves lookups by name
  // Float weights don't compress: skip the attempt, store them out of line as they are.
  afterInitial: `
    ALTER TABLE interventions ALTER COLUMN ${COLUMNS.weights} SET STORAGE EXTERNAL;
    ALTER TABLE checkpoints ALTER COLUMN ${COLUMNS.checkpoint} SET STORAGE EXTERNAL;`,
  usageTable: '',
  cascade: ['api_keys', 'interventions', 'files', 'jobs', 'tenant_usage']
    .map(
      (t) => `ALTER TABLE ${t} DROP CONSTRAINT ${t}_tenant_id_fkey, ADD FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE CASCADE;`,
    )
    .join('\n'),
  eventSeq: ', event_seq integer NOT NULL DEFAULT 0', // unused: events are numbered under the job's row lock (sql-store.ts)
};

/** A deadlock or serialization failure: the transaction may succeed when run again. */
const retryable = (e: unknown): boolean => e instanceof DatabaseError && ['40001', '40P01'].includes(e.code!);

/** pg's own messages for connections that died or could not be made in time. */
const CONNECTION_MESSAGE =
  /Connection terminated|connection timeout|timeout exceeded when trying to connect|not queryable|Query read timeout/i;

/** A server going away, starting, out of resources or too slow (or a deadlock that outlived its retries), or a socket failing. */
function isUnavailable(e: unknown): boolean {
  if (e instanceof DatabaseError) return /^(08|53|57P0[123]|57014|40001|40P01)/.test(e.code ?? '');
  // Node reports a failed connect to every address of a host ('localhost': ::1 and 127.0.0.1) as one AggregateError.
  if (e instanceof AggregateError) return e.errors.some(isUnavailable);
  return e instanceof Error && (/^E[A-Z]+$/.test(String((e as NodeJS.ErrnoException).code)) || CONNECTION_MESSAGE.test(e.message));
}

/** The error a caller sees: an unreachable database is 'unavailable', its driver's words (hosts, ports) kept for the log only. */
function toStoreError(e: unknown): unknown {
  if (e instanceof ReftError || !isUnavailable(e)) return e;
  // the driver's words name hosts and ports: they go to the log as the cause, not to clients
  return databaseUnavailable(undefined, { retryAfterSeconds: RETRY_AFTER_SECONDS, cause: e });
}

/** Kysely's driver, translating errors where they happen; a deadlock goes on to the store, which runs its transaction again. */
class GuardedDriver extends PostgresDriver {
  private readonly guarded = new WeakSet<DatabaseConnection>();

  override async acquireConnection(): Promise<DatabaseConnection> {
    const connection = await super.acquireConnection().catch((e) => Promise.reject(toStoreError(e)));
    if (this.guarded.has(connection)) return connection;
    const run = connection.executeQuery.bind(connection);
    const fail = (e: unknown) => Promise.reject(retryable(e) ? e : toStoreError(e));
    connection.executeQuery = ((query) => run(query).catch(fail)) as DatabaseConnection['executeQuery'];
    this.guarded.add(connection);
    return connection;
  }
}

class GuardedDialect extends PostgresDialect {
  constructor(private readonly pool: Pool) {
    super({ pool });
  }

  override createDriver(): Driver {
    return new GuardedDriver({ pool: this.pool });
  }
}

// pg sends Buffers as bytea, binary, without copying; results are handed back as plain Uint8Array views.
const bytea = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);
const bytesOf = (b: Buffer): Uint8Array => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

/** Connects, migrates the schema and starts listening; fails (cleaning up) if any step does. */
export async function openPostgresStore(url: string, options: PostgresStoreOptions = {}): Promise<Store> {
  const log = options.log ?? ((message: string) => process.emitWarning(`postgres store: ${message}`));
  const config = clientConfig(url, options);
  const pool = new Pool({ ...config, max: options.maxConnections ?? 10, idleTimeoutMillis: 30_000 });
  // A dying idle client is reported here, and dropped; unhandled, 'error' would end the process.
  pool.on('error', (err) => log(`an idle database connection failed: ${err.message}`));
  // A checked-out client's failing query reports the error; the pool drops it on release.
  const ignore = () => {};
  pool.on('acquire', (client) => client.on('error', ignore));
  pool.on('release', (_, client) => client.off('error', ignore));
  const db = new Kysely<Tables>({ dialect: new GuardedDialect(pool) });
  // Sent with every NOTIFY, so this store skips the echoes of its own (it fired its listeners at commit).
  const sender = randomBytes(8).toString('hex');
  let listener: Listener | undefined;
  const store = new SqlStore({
    db,
    now: () => sql<string>`now()`,
    leaseAt: (ms) => sql<string>`now() + ${ms} * interval '1 millisecond'`,
    lock: (query, mode) => {
      const q = query as AnySelect;
      const locks = {
        row: () => q.forNoKeyUpdate(),
        share: () => q.forKeyShare(),
        skip: () => q.forNoKeyUpdate().skipLocked(),
        delete: () => q.forUpdate(),
      };
      return locks[mode]() as typeof query;
    },
    addUsage: async (db, rows) => {
      const column = <K extends keyof (typeof rows)[0]>(k: K) => rows.map((r) => r[k]);
      // One statement for the batch. Its tenants are locked FOR KEY SHARE (as a foreign key check
      // does): a concurrent delete waits, or has happened and the row is skipped, never an FK
      // violation. Rows go in the (sorted) order given, so concurrent batches lock alike.
      await sql`
        WITH live AS (SELECT id FROM tenants WHERE id = ANY(${column('tenantId')}::text[]) FOR KEY SHARE)
        INSERT INTO tenant_usage AS u (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens)
        SELECT e.tenant_id, e.day, e.requests, e.prompt_tokens, e.completion_tokens, e.training_tokens
        FROM unnest(${column('tenantId')}::text[], ${column('day')}::date[], ${column('requests')}::bigint[],
                    ${column('promptTokens')}::bigint[], ${column('completionTokens')}::bigint[], ${column('trainingTokens')}::bigint[])
             WITH ORDINALITY AS e (tenant_id, day, requests, prompt_tokens, completion_tokens, training_tokens, n)
        WHERE e.tenant_id IN (SELECT id FROM live)
        ORDER BY e.n
        ON CONFLICT (tenant_id, day) DO UPDATE
        SET requests = u.requests + excluded.requests, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = u.completion_tokens + excluded.completion_tokens,
            training_tokens = u.training_tokens + excluded.training_tokens`.execute(db);
    },
    notify: async (tx, channel, payload) => void (await sql`SELECT pg_notify(${CHANNELS[channel]}, ${`${sender} ${payload}`})`.execute(tx)),
    violation: (e) => (e instanceof DatabaseError ? ({ '23505': 'unique', '23503': 'foreignKey' } as const)[e.code as '23505'] : undefined),
    retryable,
    toStoreError,
    blobs: {
      columns: COLUMNS,
      external: false,
      where: 'the database',
      stage: async (_owner, _kinds, bytes) => ({ values: bytes.map(bytea), promote: () => {}, settle: async () => {} }),
      // One statement reads every column of one row version: never half of a replace.
      read: async (values) => values.map((v) => bytesOf(v as Buffer)),
      release: async () => {},
    },
    close: async () => {
      await listener?.close();
      await db.destroy();
    },
  });
  try {
    await migrate(
      db,
      migrations(TYPES, COLUMNS),
      {
        database: 'the database',
        time: 'timestamptz NOT NULL DEFAULT now()',
        // First, before anything else: concurrent CREATE TABLE IF NOT EXISTS can itself collide.
        lock: async (tx) => void (await sql`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY})`.execute(tx)),
        exec: async (tx, text) => void (await sql.raw(text).execute(tx)),
      },
      options.schemaVersion,
    );
    listener = new Listener(config, Object.values(CHANNELS), {
      notification: ({ channel, payload = '' }) => {
        const [from, id] = payload.split(' ');
        if (from === sender) return;
        if (channel === CHANNELS.interventionChanged) store.interventionListeners.emit(id);
        else store.jobListeners.emit();
      },
      reconnected: () => {
        log('the LISTEN connection is back');
        store.jobListeners.emit(); // a job queued while we were deaf would otherwise wait for a poll
      },
      lost: (err) => log(`the LISTEN connection was lost (${err.message}); reconnecting`),
    });
    await listener.start();
    return store;
  } catch (e) {
    await db.destroy().catch(() => {});
    throw toStoreError(e);
  }
}

/** Settings every connection of the store gets, the pool's and the listener's. */
function clientConfig(url: string, options: PostgresStoreOptions): PoolConfig {
  // Values as the SQLite store reads them: int8 (counts, sums, sequence numbers, byte sizes: all
  // far below 2^53) as a JS number, timestamptz as ISO text, json as its text, a date as YYYY-MM-DD.
  const types = new TypeOverrides();
  const timestamp = types.getTypeParser(1184, 'text') as unknown as (text: string) => Date;
  types.setTypeParser(20, 'text', Number);
  types.setTypeParser(1184, 'text', (text) => timestamp(text).toISOString());
  types.setTypeParser(114, 'text', (text) => text);
  types.setTypeParser(1082, 'text', (text) => text);
  return {
    connectionString: url,
    types,
    application_name: 'reft-server',
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    statement_timeout: options.statementTimeoutMs ?? 30_000,
    idle_in_transaction_session_timeout: IDLE_IN_TRANSACTION_TIMEOUT_MS,
    keepAlive: true,
  };
}
