import { tenantConcurrencyLimited } from '../errors.ts';

/**
 * Per-tenant bounds a shared server enforces: generations over the concurrency limit wait in the
 * tenant's own bounded queue, and only a full queue answers 429 with Retry-After; a full
 * quota (stored interventions, their bytes, training files' bytes, unfinished jobs) answers 403
 * quota_exceeded, since retrying doesn't help until something is deleted or finishes.
 */
export interface TenantLimits {
  maxConcurrentRequests: number;
  /** Generations that may wait for one of the tenant's slots; beyond this, 429. */
  maxQueuedRequests: number;
  maxInterventions: number;
  maxInterventionBytes: number;
  maxFileBytes: number;
  maxActiveJobs: number;
}

export const DEFAULT_TENANT_LIMITS: TenantLimits = {
  maxConcurrentRequests: 16,
  maxQueuedRequests: 32,
  maxInterventions: 1000,
  maxInterventionBytes: 1024 ** 3,
  maxFileBytes: 1024 ** 3,
  maxActiveJobs: 20,
};

/** Counts a tenant's generations in flight on this server process. */
export class ConcurrencyLimiter {
  private readonly active = new Map<string, number>();
  constructor(
    private readonly max: number,
    private readonly what = 'concurrent requests',
  ) {}

  /** Takes a slot or throws 429; call the returned function exactly once to give it back. */
  acquire(tenantId: string): () => void {
    const n = this.active.get(tenantId) ?? 0;
    if (n >= this.max) {
      throw tenantConcurrencyLimited({ what: this.what, limit: this.max }, undefined, { retryAfterSeconds: 1 });
    }
    this.active.set(tenantId, n + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.active.get(tenantId) ?? 1) - 1;
      if (left <= 0) this.active.delete(tenantId);
      else this.active.set(tenantId, left);
    };
  }
}
