import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import pg from 'pg';

/**
 * Fresh PostgreSQL databases for tests, created (and dropped) through the role of
 * REFT_TEST_DATABASE_URL, which needs CREATEDB. A missing server fails the tests: it is not a skip.
 */
export const ADMIN_URL = process.env.REFT_TEST_DATABASE_URL ?? 'postgres://reft:reft@127.0.0.1:5432/reft_test';
const HOW_TO_START = 'start it with `bash .ci/postgres.sh` (as root), or point REFT_TEST_DATABASE_URL at a server whose role has CREATEDB';

/** Runs statements on the admin database with a short-lived connection. */
export async function admin<T>(body: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: ADMIN_URL, connectionTimeoutMillis: 5_000 });
  try {
    await client.connect();
  } catch (e) {
    throw new Error(`PostgreSQL is not reachable at ${ADMIN_URL} (${(e as Error).message}): ${HOW_TO_START}`);
  }
  try {
    return await body(client);
  } finally {
    await client.end();
  }
}

export function databaseUrl(name: string): string {
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

export async function createDatabase(): Promise<string> {
  const name = `reft_t_${randomBytes(6).toString('hex')}`;
  await admin((c) => c.query(`CREATE DATABASE ${name}`));
  return databaseUrl(name);
}

export async function dropDatabase(url: string): Promise<void> {
  const name = new URL(url).pathname.slice(1);
  // FORCE: a process that died midway may have left a connection open. An autovacuum worker
  // visiting the fresh database can still refuse the drop for a moment: try a few times.
  for (let attempt = 1; ; attempt++) {
    try {
      await admin((c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`));
      return;
    } catch (e) {
      if (attempt >= 10) throw e;
      await new Promise((r) => setTimeout(r, 200 * attempt));
    }
  }
}

/** The storage backends the API and training tests run against. */
export const BACKENDS = ['sqlite', 'postgres'] as const;
export type Backend = (typeof BACKENDS)[number];

/** Rows of one query on the given database. */
export async function pgQuery(url: string, sql: string): Promise<Record<string, unknown>[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query(sql)).rows;
  } finally {
    await client.end();
  }
}

// ---------------------------------------------------------------------------------------------
// A database restart under an open store. Stops and starts the server with Debian's
// pg_ctlcluster, so it needs the server on this machine and the rights to do that (root, as in CI).
// ---------------------------------------------------------------------------------------------

const run = promisify(execFile);

export interface PostgresServer {
  stop(): Promise<void>;
  start(): Promise<void>;
  /** Starts the server if this test stopped it and did not start it again. */
  restore(): Promise<void>;
}

/** The Debian cluster ("15/main") serving the test database, from its cluster_name setting. */
export async function postgresServer(): Promise<PostgresServer> {
  const name: string = await admin(async (c) => (await c.query('SHOW cluster_name')).rows[0].cluster_name);
  const match = /^(\d+)\/(\S+)$/.exec(name);
  if (!match)
    throw new Error(
      `cannot tell the server's cluster (cluster_name = "${name}"): the outage test needs a Debian cluster, see .ci/postgres.sh`,
    );
  const [, version, cluster] = match;
  let stopped = false;
  const server: PostgresServer = {
    async stop() {
      stopped = true;
      await run('pg_ctlcluster', [version, cluster, 'stop', '-m', 'fast']);
    },
    async start() {
      await run('pg_ctlcluster', [version, cluster, 'start']);
      stopped = false;
    },
    async restore() {
      if (stopped) await server.start();
    },
  };
  return server;
}
