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
 * The rows a `recordUsage` call writes (the contract is in store.ts): every entry checked (an
 * invalid one is an invalid_request on `entries[i].<field>`, before anything is written), those
 * of one tenant and day merged (a statement may not update one row twice), all-zero ones dropped,
 * sorted by tenant and day so that concurrent batches lock rows in the same order.
 */
export function usageBatch(entries: readonly UsageRecord[]): UsageRecord[] {
  if (!Array.isArray(entries)) throw usageRecordInvalid({ problem: 'usage entries must be an array' }, 'entries');
  const merged = new Map<string, UsageRecord>();
  entries.forEach((e, i) => {
    const at = `entries[${i}]`;
    if (typeof e?.tenantId !== 'string' || e.tenantId === '')
      throw usageRecordInvalid({ problem: 'must be a tenant id' }, `${at}.tenantId`);
    if (!isUsageDay(e.day)) throw usageRecordInvalid({ problem: 'must be a date YYYY-MM-DD' }, `${at}.day`);
    for (const k of USAGE_COUNTERS) {
      if (!Number.isSafeInteger(e[k]) || e[k] < 0) throw usageRecordInvalid({ problem: 'must be a non-negative integer' }, `${at}.${k}`);
    }
    if (USAGE_COUNTERS.every((k) => e[k] === 0)) return;
    const key = `${e.tenantId}\u0000${e.day}`;
    const row = merged.get(key) ?? {
      tenantId: e.tenantId,
      day: e.day,
      requests: 0,
      promptTokens: 0,
      completionTokens: 0,
      trainingTokens: 0,
    };
    for (const k of USAGE_COUNTERS) row[k] += e[k];
    merged.set(key, row);
  });
  const order = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  return [...merged.values()].sort((a, b) => order(a.tenantId, b.tenantId) || order(a.day, b.day));
}

/** Checks a `getUsage` range: each end a YYYY-MM-DD date (invalid_request on "from" / "to"). */
export function checkUsageRange(from: string, to: string): void {
  if (!isUsageDay(from)) throw usageRangeInvalid({ problem: 'must be a date YYYY-MM-DD' }, 'from');
  if (!isUsageDay(to)) throw usageRangeInvalid({ problem: 'must be a date YYYY-MM-DD' }, 'to');
}
