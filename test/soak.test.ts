import { describe, expect, it } from 'vitest';
import { soakCluster } from './support/cluster.ts';

/**
 * A short soak of two servers and one worker on PostgreSQL (the bench runs the long one and
 * commits its figures: `npm run bench -- soak`).
 */
describe('soak', () => {
  it('concurrent generation over many interventions plus training jobs: no failures, memory flat, every job succeeds', async () => {
    const report = await soakCluster({ seconds: 40, clients: 6, interventions: 12, jobEverySeconds: 6 });
    expect(report.failures).toEqual([]);
    expect(report.requests).toBeGreaterThan(100);
    expect(report.jobs.submitted).toBeGreaterThanOrEqual(4);
    expect(report.jobs.succeeded).toBe(report.jobs.submitted);
    for (const growth of report.rss_growth_after_warmup_percent) expect(growth).toBeLessThan(15);
  }, 180_000);
});
