import { randomBytes } from 'node:crypto';
import { sql } from 'kysely';
import { cursorUnknown, storedFileMissing } from '../errors.ts';
import type { AnySelect, Blobs } from './dialect.ts';
import type { Kysely } from 'kysely';
import type { Tables } from './schema.ts';
import { JOB_STATUSES, type JobStatus, type Page, type PageRequest, type StoredUsage } from './store.ts';

/** A prefix naming the kind of row, then 96 random bits: opaque, safe in URLs and file names (blob-files.ts). */
export const newId = (prefix: 'ten_' | 'key_' | 'iv_' | 'comp_' | 'file_' | 'job_'): string => prefix + randomBytes(12).toString('hex');
export const INTERVENTION_ID = /^iv_[0-9a-f]{24}$/;
export const COMPOSITION_ID = /^comp_[0-9a-f]{24}$/;

/** Reading rows for the store (sql-store.ts): pages in insertion order, counts, and the file bytes rows hold or name. */

/** Re-reads of a row whose blob vanished under us (replaced or deleted between two reads). */
const BLOB_READ_RETRIES = 3;

/** Whether a write changed exactly one row. */
export const one = (r: { numUpdatedRows?: bigint; numDeletedRows?: bigint }): boolean => (r.numUpdatedRows ?? r.numDeletedRows) === 1n;
export const orNull = <R, T>(row: R | null | undefined, map: (row: R) => T): T | null => (row ? map(row) : null);

/** Limits are capped by the caller; this only keeps them a positive integer. */
export const clampLimit = (limit: number): number => (Number.isFinite(limit) ? Math.max(1, Math.floor(limit)) : 1);

/**
 * A page of `from` in insertion order (a hidden seq), or newest first; asks for one row more
 * than the limit to learn whether a next page exists. The cursor is looked up within `from`'s
 * scope, so one naming no visible row (deleted, another tenant's) is refused.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function pageOf<T>(
  from: AnySelect,
  cols: readonly string[],
  req: PageRequest,
  map: (r: any) => T,
  desc = false,
): Promise<Page<T>> {
  const limit = clampLimit(req.limit);
  let rows = from.select(cols);
  if (req.after !== undefined) {
    const cursor = await from.select('seq').where('id', '=', req.after).executeTakeFirst();
    if (!cursor) throw cursorUnknown({ cursor: req.after }, 'after');
    rows = rows.where('seq', desc ? '<' : '>', cursor.seq);
  }
  const found = await rows
    .orderBy('seq', desc ? 'desc' : 'asc')
    .limit(limit + 1)
    .execute();
  const data = found.slice(0, limit);
  return { data: data.map(map), nextCursor: found.length > limit ? data[limit - 1].id : null };
}

/** Blob columns as b0, b1...: their names differ per dialect, and would be camelCased in results. */
const aliased = (columns: string[]) => columns.map((c, i) => sql.ref(c).as(`b${i}`));

/** The blob column values of the rows `from` finds, where they name files to release later (else none). */
export async function blobsOf(blobs: Blobs, from: AnySelect, columns: string[]): Promise<unknown[]> {
  if (!blobs.external) return [];
  return (await from.select(aliased(columns)).execute()).flatMap((row) => columns.map((_, i) => row[`b${i}`]));
}

/** Reads a row's blobs (and what else `from` selects); one that vanished between reading the row and the file means: read the row again. */
export async function readBlobs(
  blobs: Blobs,
  from: AnySelect,
  columns: string[],
): Promise<{ row: Record<string, unknown>; data: Uint8Array[] } | null> {
  for (let attempt = 0; ; attempt++) {
    const row = await from.select(aliased(columns)).executeTakeFirst();
    if (!row) return null;
    const data = await blobs.read(columns.map((_, i) => row[`b${i}`]));
    if (data) return { row, data };
    if (attempt >= BLOB_READ_RETRIES) throw storedFileMissing({ where: blobs.where });
  }
}

/** What a tenant has stored: interventions, files and their bytes, and its unfinished jobs. */
export async function countStored(db: Kysely<Tables>, tenantId: string): Promise<StoredUsage> {
  const [n, sum] = [sql<number>`count(*)`.as('n'), sql<number>`cast(coalesce(sum(bytes), 0) as bigint)`.as('bytes')];
  const owned = (table: 'interventions' | 'files' | 'jobs') => db.selectFrom(table).select(n).where('tenantId', '=', tenantId);
  const sized = (table: 'interventions' | 'files') => owned(table).select(sum).executeTakeFirstOrThrow();
  const [row, files] = [await sized('interventions'), await sized('files')];
  const jobs = await owned('jobs').where('status', 'in', ['queued', 'running']).executeTakeFirstOrThrow();
  const [interventions, bytes, fileCount, fileBytes] = [row.n, row.bytes, files.n, files.bytes].map(Number);
  return { interventions, bytes, files: fileCount, fileBytes, activeJobs: Number(jobs.n) };
}

/** Jobs of every tenant per status, every status named. */
export async function countJobs(db: Kysely<Tables>): Promise<Record<JobStatus, number>> {
  const perStatus = db.selectFrom('jobs').select(['status', sql<number>`count(*)`.as('n')]);
  const rows = await perStatus.groupBy('status').execute();
  return Object.fromEntries(JOB_STATUSES.map((s) => [s, Number(rows.find((r) => r.status === s)?.n ?? 0)])) as Record<JobStatus, number>;
}
