import type { ApiKey, InterventionMeta, Job, JobEvent, JobStatus, StoredFile, Tenant } from './store.ts';

/**
 * Rows as a store's driver returns them, and their mapping to the interface's types. Both stores
 * have the same tables and columns; what differs is how their drivers hand back three kinds of
 * column. A store names those (ColumnTypes), says how to read them (ColumnReaders) and gets its
 * mappers from rowMappers(). Columns only one store has (blob names, leases) it adds to these
 * rows itself.
 */
export interface ColumnTypes {
  /** A timestamp. */
  time: unknown;
  /** A JSON document. */
  json: unknown;
  /** A boolean. */
  flag: unknown;
}

export interface ColumnReaders<C extends ColumnTypes> {
  /** As an ISO 8601 string. */
  time(value: C['time']): string;
  /** As the value the document holds. */
  json(value: C['json']): unknown;
  flag(value: C['flag']): boolean;
}

/** JSON text for a JSON column; undefined is stored as null. (Given objects, pg would turn arrays into PG arrays.) */
export const jsonText = (value: unknown): string => JSON.stringify(value ?? null);

export interface TenantRow<C extends ColumnTypes> {
  id: string;
  name: string;
  created_at: C['time'];
}

export interface KeyRow<C extends ColumnTypes> {
  id: string;
  tenant_id: string;
  created_at: C['time'];
  revoked_at: C['time'] | null;
}

/** A key joined with its tenant's columns (findApiKey). */
export interface KeyWithTenantRow<C extends ColumnTypes> extends KeyRow<C> {
  tenant_name: string;
  tenant_created_at: C['time'];
}

export interface InterventionRow<C extends ColumnTypes> {
  id: string;
  tenant_id: string | null;
  name: string;
  description: string | null;
  source: InterventionMeta['source'];
  config: C['json'];
  version: number;
  bytes: number;
  sha256: string;
  created_at: C['time'];
  updated_at: C['time'];
}

export interface FileRow<C extends ColumnTypes> {
  id: string;
  tenant_id: string;
  filename: string;
  purpose: string;
  bytes: number;
  created_at: C['time'];
}

export interface JobRow<C extends ColumnTypes> {
  id: string;
  tenant_id: string;
  status: JobStatus;
  spec: C['json'];
  progress: C['json'];
  error: string | null;
  intervention_id: string | null;
  attempts: number;
  cancel_requested: C['flag'];
  created_at: C['time'];
  started_at: C['time'] | null;
  finished_at: C['time'] | null;
}

export interface EventRow<C extends ColumnTypes> {
  job_id: string;
  seq: number;
  created_at: C['time'];
  type: string;
  data: C['json'];
}

export interface RowMappers<C extends ColumnTypes> {
  toTenant(row: TenantRow<C>): Tenant;
  toKey(row: KeyRow<C>): ApiKey;
  toKeyWithTenant(row: KeyWithTenantRow<C>): { key: ApiKey; tenant: Tenant };
  toIntervention(row: InterventionRow<C>): InterventionMeta;
  toFile(row: FileRow<C>): StoredFile;
  toJob(row: JobRow<C>): Job;
  toEvent(row: EventRow<C>): JobEvent;
}

export function rowMappers<C extends ColumnTypes>(read: ColumnReaders<C>): RowMappers<C> {
  const timeOrNull = (value: C['time'] | null): string | null => (value === null ? null : read.time(value));
  const toKey = (r: KeyRow<C>): ApiKey => ({
    id: r.id,
    tenantId: r.tenant_id,
    createdAt: read.time(r.created_at),
    revokedAt: timeOrNull(r.revoked_at),
  });
  return {
    toTenant: (r) => ({ id: r.id, name: r.name, createdAt: read.time(r.created_at) }),
    toKey,
    toKeyWithTenant: (r) => ({
      key: toKey(r),
      tenant: { id: r.tenant_id, name: r.tenant_name, createdAt: read.time(r.tenant_created_at) },
    }),
    toIntervention: (r) => ({
      id: r.id,
      tenantId: r.tenant_id,
      name: r.name,
      description: r.description,
      source: r.source,
      config: read.json(r.config),
      version: r.version,
      bytes: r.bytes,
      sha256: r.sha256,
      createdAt: read.time(r.created_at),
      updatedAt: read.time(r.updated_at),
    }),
    toFile: (r) => ({
      id: r.id,
      tenantId: r.tenant_id,
      filename: r.filename,
      purpose: r.purpose,
      bytes: r.bytes,
      createdAt: read.time(r.created_at),
    }),
    toJob: (r) => ({
      id: r.id,
      tenantId: r.tenant_id,
      status: r.status,
      spec: read.json(r.spec),
      progress: read.json(r.progress),
      error: r.error,
      interventionId: r.intervention_id,
      attempts: r.attempts,
      cancelRequested: read.flag(r.cancel_requested),
      createdAt: read.time(r.created_at),
      startedAt: timeOrNull(r.started_at),
      finishedAt: timeOrNull(r.finished_at),
    }),
    toEvent: (r) => ({
      seq: r.seq,
      jobId: r.job_id,
      createdAt: read.time(r.created_at),
      type: r.type,
      data: read.json(r.data),
    }),
  };
}
