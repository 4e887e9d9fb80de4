import { Kysely, PostgresDialect, PostgresDriver, sql } from 'kysely';
import type { CompiledQuery, DatabaseConnection, Driver, TransactionSettings } from 'kysely';
import { DatabaseError, Pool, TypeOverrides } from 'pg';
import type { PoolConfig } from 'pg';
import { ReftError, databaseUnavailable } from '../errors.ts';
import { Listener } from './pg-listener.ts';
import { EVENT_COLUMNS, migrate, migrations, migrationsUpTo } from './schema.ts';
import type { BlobColumns, EventRow, SqlTypes, Tables } from './schema.ts';
import type { Dialect } from './dialect.ts';
import { SqlStore } from './sql-store.ts';
import type { Store } from './store.ts';

/**
 * The PostgreSQL dialect: everything, file bytes included (bytea), lives in one database, so
 * servers and training workers on different hosts share it. Particular to it:
 * - Time is the database clock (now(), the start of the transaction), for timestamps and lease
 *   expiry alike, so hosts with skewed clocks still agree on whether a lease has expired.
 * - Listeners fire in every process: a write that deletes or replaces an intervention, or queues
 *   a job, sends NOTIFY in its transaction, heard on each process's LISTEN connection
 *   (pg-listener.ts). The writer skips the echo of its own NOTIFY (by backend pid). Notifications
 *   sent while the LISTEN connection is down are lost: on reconnecting, job listeners are woken.
 * - A statement or transaction that hits a deadlock or serialization failure is run again.
 * - An unreachable database fails calls fast with ReftError 'unavailable' (503 + Retry-After);
 *   the pool and the LISTEN connection reconnect by themselves.
 * - claimJob takes the oldest claimable row FOR NO KEY UPDATE SKIP LOCKED (which excludes other
 *   claimers, not the foreign-key checks of event inserts): claimers never wait on each other.
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

/** Connect attempts give up after this: an unreachable database must fail a request fast. */
const CONNECT_TIMEOUT_MS = 2_000;
/** A session stuck inside a transaction (a hung process) is ended by the server after this. */
const IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000;
/** What an 'unavailable' error tells clients to wait before retrying. */
const RETRY_AFTER_SECONDS = 2;
/** Attempts of a statement that fails with a deadlock or serialization failure. */
const STATEMENT_ATTEMPTS = 3;
/** How long a closed pool connection's backend pid still counts as ours (its NOTIFY echo may be in flight). */
const ECHO_GRACE_MS = 60_000;
/** pg_advisory_xact_lock key serialising migrations across processes ('reft' in ASCII). */
const MIGRATION_LOCK_KEY = 0x72656674;

/** NOTIFY channels (per database, so stores on different databases never hear each other); payload: the row's id. */
const CHANNELS = { interventionChanged: 'reft_intervention_changed', jobQueued: 'reft_job_queued' } as const;

const COLUMNS: BlobColumns = { config: 'config_file', weights: 'weights_file', file: 'data', checkpoint: 'state' };

const TYPES: SqlTypes = {
  seq: 'bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY',
  time: 'timestamptz',
  nowDefault: ' DEFAULT now()',
  // json, not jsonb, for documents the store only hands back: it keeps the text as written.
  json: 'json',
  flag: 'boolean',
  falseValue: 'false',
  big: 'bigint',
  blob: 'bytea',
  lease: 'timestamptz',
  day: 'date NOT NULL',
  // Name first: it also serves lookups by name.
  nameKey: `(name, (coalesce(tenant_id, '')))`,
  // Float weights don't compress: skip the attempt, store them out of line as they are.
  afterInitial: `
    ALTER TABLE interventions ALTER COLUMN ${COLUMNS.weights} SET STORAGE EXTERNAL;
    ALTER TABLE checkpoints ALTER COLUMN ${COLUMNS.checkpoint} SET STORAGE EXTERNAL;`,
  usageTable: '',
  // The last event number given out for the job. Bumping it locks the job row, so concurrent
  // appends to one job get consecutive numbers instead of colliding.
  eventSeq: ', event_seq integer NOT NULL DEFAULT 0',
};

const MIGRATIONS = migrations(TYPES, COLUMNS);

const sqlState = (e: unknown): string | undefined => (e instanceof DatabaseError ? e.code : undefined);

/** Socket-level failures to reach or keep a connection to the server. */
const NETWORK_CODES = new Set(
  'ECONNREFUSED ECONNRESET ECONNABORTED ETIMEDOUT EPIPE EHOSTUNREACH ENETUNREACH ENOTFOUND EAI_AGAIN'.split(' '),
);

/** A deadlock or serialization failure: the transaction may succeed when run again. */
const retryable = (e: unknown): boolean => ['40001', '40P01'].includes(sqlState(e) ?? '');

/** SQLSTATEs of a server going away, starting, out of resources or too slow, and a deadlock that outlived its retries. */
const transientState = (state: string): boolean =>
  /^(08|53)/.test(state) || ['57P01', '57P02', '57P03', '57014', '40001', '40P01'].includes(state);

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
  // the driver's words name hosts and ports: they go to the log as the cause, not to clients
  return databaseUnavailable(undefined, { retryAfterSeconds: RETRY_AFTER_SECONDS, cause: e });
}

/**
 * Kysely's PostgreSQL driver, with errors translated where they happen: a statement on its own
 * is run again on deadlock; one inside a transaction leaves that to the store, which runs the
 * whole transaction again.
 */
class GuardedDriver extends PostgresDriver {
  private readonly guarded = new WeakSet<DatabaseConnection>();
  private readonly inTransaction = new WeakSet<DatabaseConnection>();

  override async acquireConnection(): Promise<DatabaseConnection> {
    const connection = await super.acquireConnection().catch((e) => Promise.reject(toStoreError(e)));
    if (this.guarded.has(connection)) return connection;
    const run = connection.executeQuery.bind(connection);
    connection.executeQuery = (async (query: CompiledQuery) => {
      for (let attempt = 1; ; attempt++) {
        try {
          return await run(query);
        } catch (e) {
          if (this.inTransaction.has(connection)) throw retryable(e) ? e : toStoreError(e);
          if (attempt >= STATEMENT_ATTEMPTS || !retryable(e)) throw toStoreError(e);
        }
      }
    }) as DatabaseConnection['executeQuery'];
    this.guarded.add(connection);
    return connection;
  }

  override async beginTransaction(connection: DatabaseConnection, settings: TransactionSettings): Promise<void> {
    this.inTransaction.add(connection);
    await super.beginTransaction(connection, settings);
  }

  override async commitTransaction(connection: DatabaseConnection): Promise<void> {
    await super.commitTransaction(connection).finally(() => this.inTransaction.delete(connection));
  }

  override async rollbackTransaction(connection: Parameters<PostgresDriver['rollbackTransaction']>[0]): Promise<void> {
    await super.rollbackTransaction(connection).finally(() => this.inTransaction.delete(connection));
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

/** The server process serving this client (pg knows it from the startup handshake, but doesn't type it). */
const backendPid = (client: unknown): number | undefined => (client as { processID?: number }).processID;

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
  // Backend pids of our pool connections: NOTIFYs they send are our own echoes.
  const ownBackends = new Set<number | undefined>();
  pool.on('connect', (client) => ownBackends.add(backendPid(client)));
  pool.on('remove', (client) => void setTimeout(() => ownBackends.delete(backendPid(client)), ECHO_GRACE_MS).unref());
  const db = new Kysely<Tables>({ dialect: new GuardedDialect(pool) });
  let listener: Listener | undefined;
  const dialect: Dialect = {
    db,
    now: () => sql<string>`now()`,
    leaseNow: () => sql<string>`now()`,
    leaseUntil: (ms) => sql<string>`now() + ${ms} * interval '1 millisecond'`,
    flag: (value) => value,
    lock: (query, mode) => (mode === 'skip' ? query.forNoKeyUpdate().skipLocked() : query.forNoKeyUpdate()) as typeof query,
    addEvent: async (tx, jobId, type, data, at) => {
      const { rows } = await sql<EventRow>`
        WITH next AS (UPDATE jobs SET event_seq = event_seq + 1 WHERE id = ${jobId} RETURNING id, event_seq)
        INSERT INTO job_events (job_id, seq, created_at, type, data)
        SELECT id, event_seq, ${at}, ${type}, ${data} FROM next
        RETURNING ${EVENT_COLUMNS}`.execute(tx);
      return rows[0];
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
    notify: async (tx, channel, payload) => void (await sql`SELECT pg_notify(${CHANNELS[channel]}, ${payload})`.execute(tx)),
    violation: (e) => (({ '23505': 'unique', '23503': 'foreignKey' }) as const)[sqlState(e) as '23505'],
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
  };
  const store = new SqlStore(dialect);
  try {
    await migrate(db, migrationsUpTo(MIGRATIONS, options.schemaVersion), {
      database: 'the database',
      time: 'timestamptz NOT NULL DEFAULT now()',
      // First, before anything else: concurrent CREATE TABLE IF NOT EXISTS can itself collide.
      lock: async (tx) => void (await sql`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY})`.execute(tx)),
      exec: async (tx, text) => void (await sql.raw(text).execute(tx)),
    });
    listener = new Listener(config, [CHANNELS.interventionChanged, CHANNELS.jobQueued], {
      notification: (msg) => {
        // Our own write already fired our listeners when it committed.
        if (ownBackends.has(msg.processId)) return;
        if (msg.channel === CHANNELS.interventionChanged && msg.payload) store.interventionListeners.emit(msg.payload);
        else if (msg.channel === CHANNELS.jobQueued) store.jobListeners.emit();
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
  // Values as the SQLite store reads them: int8 (counts, sums, sequence numbers, byte sizes) as
  // a JS number (all stay far below 2^53), timestamptz as ISO text, json as its text, a date as
  // YYYY-MM-DD.
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
