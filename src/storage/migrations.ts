/**
 * Schema migrations, as both stores keep them: a list numbered from 1, applied in order and
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
