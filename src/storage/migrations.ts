import type { Kysely } from 'kysely';
import type { Tables } from './schema.ts';

/**
 * Schema migrations (schema.ts writes them): a list numbered from 1, applied in order and
 * recorded in a schema_migrations table. The list is append-only: never edit a migration that
 * has shipped, add the next version.
 */
export interface Migration {
  version: number;
  name: string;
  sql: string;
}

/**
 * The migrations a database that has `applied` lacks, in order. A database with a version newer
 * than any here was migrated by a newer server: refused, rather than run on a schema this server
 * does not know. `database` names it in that error.
 */
export function pendingMigrations(migrations: readonly Migration[], applied: ReadonlySet<number>, database: string): Migration[] {
  const newest = migrations[migrations.length - 1].version;
  const unknown = [...applied].filter((v) => v > newest);
  if (unknown.length) {
    throw new Error(`${database} has schema version ${Math.max(...unknown)}, newer than this server's ${newest}: upgrade the server`);
  }
  return migrations.filter((m) => !applied.has(m.version));
}

/**
 * The migrations up to and including `version` (all of them when undefined). Only tests of an
 * upgrade pass a version: a store opened that way has the schema an older server left behind,
 * which is how such a test makes one.
 */
export function migrationsUpTo(migrations: readonly Migration[], version: number | undefined): readonly Migration[] {
  if (version === undefined) return migrations;
  if (!migrations.some((m) => m.version === version)) throw new Error(`no schema version ${version}`);
  return migrations.filter((m) => m.version <= version);
}

/** How a dialect runs migrations: its column types, and what only it can do. */
export interface MigrationRunner {
  /** Names the database in errors. */
  database: string;
  /** The type and default of applied_at. */
  time: string;
  /** First in the transaction: what keeps other processes out until it commits (SQLite: BEGIN IMMEDIATE already has). */
  lock(tx: Kysely<Tables>): Promise<void>;
  /** Runs a migration's SQL (several statements). */
  exec(tx: Kysely<Tables>, sql: string): Promise<void>;
}

/**
 * Applies the migrations the database lacks, in order, in one transaction that keeps other
 * processes out: a second process starting at the same time waits, then finds them applied.
 */
export async function migrate(db: Kysely<Tables>, migrations: readonly Migration[], run: MigrationRunner): Promise<void> {
  await db.transaction().execute(async (tx) => {
    await run.lock(tx);
    await run.exec(tx, `CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at ${run.time})`);
    const applied = new Set((await tx.selectFrom('schema_migrations').select('version').execute()).map((r) => r.version));
    for (const m of pendingMigrations(migrations, applied, run.database)) {
      await run.exec(tx, m.sql);
      await tx.insertInto('schema_migrations').values({ version: m.version, name: m.name, applied_at: new Date().toISOString() }).execute();
    }
  });
}
