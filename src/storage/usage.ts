import { usageRangeInvalid, usageRecordInvalid } from '../errors.ts';
import type { UsageRecord } from './store.ts';

/** Usage is kept by UTC day: YYYY-MM-DD. */
export const utcDay = (at = new Date()): string => at.toISOString().slice(0, 10);

const USAGE_COUNTERS = ['requests', 'promptTokens', 'completionTokens', 'trainingTokens'] as const;

/** A real calendar date written YYYY-MM-DD (year 1 or later: PostgreSQL has no year 0). */
function isUsageDay(day: unknown): day is string {
  if (typeof day !== 'string' || !/^\d{4}-\d{2}-\d{2}$/.test(day) || day.startsWith('0000')) return false;
  // An impossible date (2023-02-30) is NaN, or rolls over to another day.
  const date = new Date(`${day}T00:00:00Z`);
  return !Number.isNaN(date.getTime()) && date.toISOString().startsWith(day);
}

/**
 * The rows a `recordUsage` call writes: every entry checked first (an invalid one is an
 * invalid_request on `entries[i].<field>`), those of one tenant and day merged (a statement may
 * not update one row twice), all-zero ones dropped, sorted so that concurrent batches lock rows
 * in the same order.
 */
export function usageBatch(entries: readonly UsageRecord[]): UsageRecord[] {
  if (!Array.isArray(entries)) throw usageRecordInvalid({ problem: 'usage entries must be an array' }, 'entries');
  const merged = new Map<string, UsageRecord>();
  entries.forEach((e, i) => {
    if (typeof e?.tenantId !== 'string' || e.tenantId === '')
      throw usageRecordInvalid({ problem: 'must be a tenant id' }, `entries[${i}].tenantId`);
    if (!isUsageDay(e.day)) throw usageRecordInvalid({ problem: 'must be a date YYYY-MM-DD' }, `entries[${i}].day`);
    const bad = USAGE_COUNTERS.find((k) => !Number.isSafeInteger(e[k]) || e[k] < 0);
    if (bad) throw usageRecordInvalid({ problem: 'must be a non-negative integer' }, `entries[${i}].${bad}`);
    if (USAGE_COUNTERS.every((k) => e[k] === 0)) return;
    const key = `${e.tenantId}\u0000${e.day}`;
    const row = merged.get(key);
    if (row) for (const k of USAGE_COUNTERS) row[k] += e[k];
    else merged.set(key, { ...e });
  });
  return [...merged].sort(([a], [b]) => (a < b ? -1 : 1)).map(([, row]) => row);
}

/** Checks a `getUsage` range: each end a YYYY-MM-DD date (invalid_request on "from" / "to"). */
export function checkUsageRange(from: string, to: string): void {
  if (!isUsageDay(from)) throw usageRangeInvalid({ problem: 'must be a date YYYY-MM-DD' }, 'from');
  if (!isUsageDay(to)) throw usageRangeInvalid({ problem: 'must be a date YYYY-MM-DD' }, 'to');
}
