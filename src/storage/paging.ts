import { invalidRequest } from '../errors.ts';
import type { Page } from './store.ts';

/**
 * The page rules (the query is SqlStore.page). Rows are paged in creation order by a hidden
 * sequence number that starts at 1, and a page query asks for one row more than the limit, to
 * learn whether a next page exists:
 *
 *   limit = clampLimit(req.limit)
 *   rows  = <rows of the scope with seq > seqAfter(req.after, <cursor row>), limit + 1 of them>
 *   page  = pageOf(rows, limit, map)
 */

/** Limits are capped by the caller; this only keeps them a positive integer. */
export function clampLimit(limit: number): number {
  return Number.isFinite(limit) ? Math.max(1, Math.floor(limit)) : 1;
}

/**
 * The seq a page starts after: 0 without a cursor, else the seq of the cursor's row, looked up
 * within the caller's scope. A cursor that names no visible row (deleted, or another tenant's)
 * is an invalid_request on "after".
 */
export function seqAfter(after: string | undefined, cursorRow: { seq: number } | undefined): number {
  if (after === undefined) return 0;
  if (!cursorRow) throw invalidRequest(`unknown cursor "${after}"`, 'after');
  return cursorRow.seq;
}

/** The page made of the rows a page query returned when asked for `limit + 1` rows. */
export function pageOf<R extends { id: string }, T>(rows: R[], limit: number, map: (row: R) => T): Page<T> {
  const data = rows.slice(0, limit);
  return { data: data.map(map), nextCursor: rows.length > limit ? data[data.length - 1].id : null };
}
