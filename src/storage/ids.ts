import { randomBytes } from 'node:crypto';

/**
 * Ids the stores make: a prefix naming the kind of row, then 24 hex chars (96 random bits).
 * Opaque to callers, safe in URLs and in file names (the SQLite store names blob files after
 * them).
 */
const ID_PREFIX = { tenant: 'ten_', key: 'key_', intervention: 'iv_', file: 'file_', job: 'job_' } as const;

export type IdKind = keyof typeof ID_PREFIX;

const ID_PATTERN = Object.fromEntries(
  Object.entries(ID_PREFIX).map(([kind, prefix]) => [kind, new RegExp(`^${prefix}[0-9a-f]{24}$`)]),
) as Record<IdKind, RegExp>;

export function newId(kind: IdKind): string {
  return ID_PREFIX[kind] + randomBytes(12).toString('hex');
}

/** Whether `id` has the form `newId(kind)` gives (it may still name no row). */
export function isIdOf(kind: IdKind, id: string): boolean {
  return ID_PATTERN[kind].test(id);
}
