import type { Generated, Kysely } from 'kysely';
import type { CompositionItem, InterventionMeta, JobStatus } from './store.ts';

/**
 * The schema, declared once for both dialects: the tables as the store's queries see them
 * (Tables) and the migrations that make them, with each dialect's column types spliced in.
 *
 * Both drivers are set up to hand back the same values: timestamps as ISO 8601 text, JSON as
 * text, int8 as a JS number. Three kinds of column still differ and stay out of Tables: file
 * bytes (bytea, or a blob file's name: BlobColumns), booleans (read with Boolean()) and lease
 * expiry (epoch ms or a timestamp: read with new Date()).
 */

/** JSON text (jsonText writes it); undefined is stored as null. Given objects, pg would turn arrays into PG arrays. */
export type Json = string;

export const jsonText = (value: unknown): Json => JSON.stringify(value ?? null);

/** Every listed table has 'seq': it numbers rows in insert order (pages, the job queue); 'id' is the public key. */
export interface Tables {
  tenants: { seq: Generated<number>; id: string; name: string; created_at: string };
  api_keys: {
    id: string;
    tenant_id: string;
    secret_hash: string;
    prefix: string | null;
    created_at: string;
    revoked_at: string | null;
    last_used_at: string | null;
  };
  interventions: {
    seq: Generated<number>;
    id: string;
    tenant_id: string | null;
    name: string;
    description: string | null;
    source: InterventionMeta['source'];
    config: Json;
    version: number;
    bytes: number;
    sha256: string;
    created_at: string;
    updated_at: string;
  };
  compositions: {
    seq: Generated<number>;
    id: string;
    tenant_id: string | null;
    name: string;
    items: Json;
    created_at: string;
    updated_at: string;
  };
  composition_uses: { composition_id: string; intervention_id: string };
  files: { seq: Generated<number>; id: string; tenant_id: string; filename: string; purpose: string; bytes: number; created_at: string };
  jobs: {
    seq: Generated<number>;
    id: string;
    tenant_id: string;
    status: JobStatus;
    spec: Json;
    progress: Json;
    error: string | null;
    intervention_id: string | null;
    attempts: Generated<number>;
    cancel_requested: Generated<boolean | number>;
    created_at: string;
    started_at: string | null;
    finished_at: string | null;
    lease_worker: string | null;
    lease_expires_at: number | string | null;
  };
  job_events: { job_id: string; seq: number; created_at: string; type: string; data: Json };
  checkpoints: { job_id: string; step: number; bytes: number; created_at: string };
  tenant_usage: {
    tenant_id: string;
    day: string;
    requests: number;
    prompt_tokens: number;
    completion_tokens: number;
    training_tokens: number;
  };
  schema_migrations: { version: number; name: string; applied_at: string };
}

/** The columns holding (or naming) each table's file bytes. */
export interface BlobColumns {
  config: string;
  weights: string;
  file: string;
  checkpoint: string;
}

/**
 * A dialect's words for the schema, spliced into the migrations: column types (seq is the
 * primary key; nowDefault a default of the current time, or nothing), nameKey the unique key of
 * an intervention's name among its owner's (or the shared) ones, cascade
 * what makes deleting a tenant delete what it owns (where the database can add that to a foreign key), afterInitial what migration 1
 * ends with, usageTable what follows tenant_usage's columns, eventSeq a job column numbering its
 * events (or nothing).
 */
type SqlWord = 'cascade' | 'seq' | 'time' | 'nowDefault' | 'json' | 'flag' | 'falseValue' | 'big' | 'blob' | 'lease' | 'day';
export type SqlTypes = Record<SqlWord | 'nameKey' | 'afterInitial' | 'usageTable' | 'eventSeq', string>;

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

/** The migrations, numbered from 1 (append-only: never edit a shipped one, add the next version). */
export function migrations(t: SqlTypes, b: BlobColumns): Migration[] {
  const created = `created_at ${t.time} NOT NULL${t.nowDefault}`;
  const owned = (table: string) => `CREATE INDEX ${table}_tenant ON ${table} (tenant_id, seq);`;
  const initial = `
    CREATE TABLE tenants (seq ${t.seq}, id text NOT NULL UNIQUE, name text NOT NULL, ${created});
    CREATE TABLE api_keys (
      id text PRIMARY KEY, tenant_id text NOT NULL REFERENCES tenants (id), secret_hash text NOT NULL UNIQUE,
      ${created}, revoked_at ${t.time}
    );
    CREATE TABLE interventions (
      seq ${t.seq}, id text NOT NULL UNIQUE, tenant_id text REFERENCES tenants (id), name text NOT NULL, description text,
      source text NOT NULL, config ${t.json} NOT NULL, version integer NOT NULL DEFAULT 1, bytes ${t.big} NOT NULL,
      sha256 text NOT NULL, ${b.config} ${t.blob} NOT NULL, ${b.weights} ${t.blob} NOT NULL, ${created},
      updated_at ${t.time} NOT NULL${t.nowDefault}
    );
    -- One name per tenant, and one among shared rows (NULLs are distinct in a UNIQUE index: shared rows are indexed under '').
    CREATE UNIQUE INDEX interventions_name ON interventions ${t.nameKey};
    ${owned('interventions')}
    CREATE TABLE files (
      seq ${t.seq}, id text NOT NULL UNIQUE, tenant_id text NOT NULL REFERENCES tenants (id), filename text NOT NULL,
      purpose text NOT NULL, bytes ${t.big} NOT NULL, ${b.file} ${t.blob} NOT NULL, ${created}
    );
    ${owned('files')}
    CREATE TABLE jobs (
      seq ${t.seq}, id text NOT NULL UNIQUE, tenant_id text NOT NULL REFERENCES tenants (id),
      status text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
      spec ${t.json} NOT NULL, progress ${t.json} NOT NULL DEFAULT 'null', error text,
      intervention_id text REFERENCES interventions (id) ON DELETE SET NULL, attempts integer NOT NULL DEFAULT 0,
      cancel_requested ${t.flag} NOT NULL DEFAULT ${t.falseValue}, ${created}, started_at ${t.time}, finished_at ${t.time},
      lease_worker text, lease_expires_at ${t.lease}${t.eventSeq}
    );
    ${owned('jobs')}
    CREATE INDEX jobs_claimable ON jobs (seq) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_intervention ON jobs (intervention_id);
    CREATE TABLE job_events (
      job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, seq integer NOT NULL, ${created}, type text NOT NULL,
      data ${t.json} NOT NULL, PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE checkpoints (
      job_id text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE, step integer NOT NULL, ${b.checkpoint} ${t.blob} NOT NULL,
      bytes ${t.big} NOT NULL, ${created}
    );
    ${t.afterInitial}`;
  const counter = (name: string) => `${name} ${t.big} NOT NULL DEFAULT 0`;
  const usage = `
    -- Usage per tenant and UTC day; recordUsage adds to the counters in place.
    CREATE TABLE tenant_usage (
      tenant_id text NOT NULL REFERENCES tenants (id), day ${t.day},
      ${['requests', 'prompt_tokens', 'completion_tokens', 'training_tokens'].map(counter).join(', ')},
      PRIMARY KEY (tenant_id, day)
    )${t.usageTable};`;
  const admin = `
    ALTER TABLE api_keys ADD COLUMN prefix text;
    ALTER TABLE api_keys ADD COLUMN last_used_at ${t.time};
    -- Tenant names become unique: a duplicate from before keeps its name with its id appended.
    UPDATE tenants SET name = name || ' (' || id || ')' WHERE seq NOT IN (SELECT min(seq) FROM tenants GROUP BY name);
    CREATE UNIQUE INDEX tenants_name ON tenants (name);
    ${t.cascade}`;
  const compositions = `
    CREATE TABLE compositions (
      seq ${t.seq}, id text NOT NULL UNIQUE, tenant_id text REFERENCES tenants (id), name text NOT NULL, items ${t.json} NOT NULL,
      ${created}, updated_at ${t.time} NOT NULL${t.nowDefault}
    );
    CREATE UNIQUE INDEX compositions_name ON compositions ${t.nameKey};
    ${owned('compositions')}
    -- The interventions each composition uses: deleting one is refused (NO ACTION) while a composition does.
    CREATE TABLE composition_uses (
      intervention_id text NOT NULL REFERENCES interventions (id),
      composition_id text NOT NULL REFERENCES compositions (id) ON DELETE CASCADE, PRIMARY KEY (intervention_id, composition_id)
    );
    CREATE INDEX composition_uses_composition ON composition_uses (composition_id);`;
  return [
    { version: 1, name: 'initial', sql: initial },
    { version: 2, name: 'tenant usage', sql: usage },
    { version: 3, name: 'tenant administration', sql: admin },
    { version: 4, name: 'compositions', sql: compositions },
  ];
}

// Rows as the store reads them: with the interface's names (COLUMNS aliases them), JSON and flags mapped.

/** The columns each kind of row is read with (never the file bytes), in the interface's order. */
export const COLUMNS = {
  tenant: ['id', 'name', 'created_at as createdAt'],
  key: ['id', 'tenant_id as tenantId', 'prefix', 'created_at as createdAt', 'revoked_at as revokedAt', 'last_used_at as lastUsedAt'],
  intervention: [
    ...['id', 'tenant_id as tenantId', 'name', 'description', 'source', 'config', 'version', 'bytes', 'sha256'],
    ...['created_at as createdAt', 'updated_at as updatedAt'],
  ],
  file: ['id', 'tenant_id as tenantId', 'filename', 'purpose', 'bytes', 'created_at as createdAt'],
  job: [
    ...['id', 'tenant_id as tenantId', 'status', 'spec', 'progress', 'error', 'intervention_id as interventionId', 'attempts'],
    ...['cancel_requested as cancelRequested', 'created_at as createdAt', 'started_at as startedAt', 'finished_at as finishedAt'],
  ],
  composition: ['id', 'tenant_id as tenantId', 'name', 'items', 'created_at as createdAt', 'updated_at as updatedAt'],
  event: ['seq', 'job_id as jobId', 'created_at as createdAt', 'type', 'data'],
  usageDay: [
    'day',
    'requests',
    'prompt_tokens as promptTokens',
    'completion_tokens as completionTokens',
    'training_tokens as trainingTokens',
  ],
} as const;

export const toIntervention = <R extends { config: Json }>(r: R) => ({ ...r, config: JSON.parse(r.config) as unknown });
export const toComposition = <R extends { items: Json }>(r: R) => ({ ...r, items: JSON.parse(r.items) as CompositionItem[] });
export const toEvent = <R extends { data: Json }>(r: R) => ({ ...r, data: JSON.parse(r.data) as unknown });
export const toJob = <R extends { spec: Json; progress: Json; cancelRequested: unknown }>(r: R) => ({
  ...r,
  spec: JSON.parse(r.spec) as unknown,
  progress: JSON.parse(r.progress) as unknown,
  cancelRequested: Boolean(r.cancelRequested),
});

/**
 * How a dialect runs migrations: `lock` runs first in the transaction and keeps other processes
 * out until it commits (SQLite: BEGIN IMMEDIATE already does), `exec` runs several statements.
 */
export interface MigrationRunner {
  database: string; // names it in errors
  time: string; // applied_at's type and default
  lock(tx: Kysely<Tables>): Promise<void>;
  exec(tx: Kysely<Tables>, sql: string): Promise<void>;
}

/**
 * Applies the migrations the database lacks, in order, recorded in schema_migrations, in one
 * transaction that keeps other processes out: a second process starting meanwhile waits, then
 * finds them applied. A database a newer server migrated is refused, not run on a schema this
 * server does not know.
 */
export async function migrate(db: Kysely<Tables>, all: readonly Migration[], run: MigrationRunner, upTo?: number): Promise<void> {
  // Only tests of an upgrade pass `upTo`, to get an older server's schema.
  if (upTo !== undefined && !all.some((m) => m.version === upTo)) throw new Error(`no schema version ${upTo}`);
  const migrations = all.filter((m) => m.version <= (upTo ?? Infinity));
  await db.transaction().execute(async (tx) => {
    await run.lock(tx);
    await run.exec(
      tx,
      `CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at ${run.time})`,
    );
    const applied = new Set((await tx.selectFrom('schema_migrations').select('version').execute()).map((r) => r.version));
    const newest = migrations[migrations.length - 1].version;
    const unknown = Math.max(...applied);
    if (unknown > newest)
      throw new Error(`${run.database} has schema version ${unknown}, newer than this server's ${newest}: upgrade the server`);
    for (const m of migrations.filter((m) => !applied.has(m.version))) {
      await run.exec(tx, m.sql);
      await tx.insertInto('schema_migrations').values({ version: m.version, name: m.name, applied_at: new Date().toISOString() }).execute();
    }
  });
}
