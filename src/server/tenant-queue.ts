import { clientDisconnectedWhileQueued, tenantQueueFull } from '../errors.ts';

interface Waiter {
  admit: (release: () => void) => void;
}

interface TenantState {
  active: number;
  waiting: Waiter[];
}

/**
 * Per-tenant concurrency with a bounded wait: a tenant runs at most `maxActive` generations on
 * this server process; more wait, first come first served, in that tenant's own queue of at most
 * `maxQueued`, and only a full queue is refused (429 with Retry-After, which clients retry). A
 * tenant's queue holds only its own requests, so one tenant's backlog never delays another's.
 */
export class TenantQueues {
  private readonly tenants = new Map<string, TenantState>();

  constructor(
    private readonly maxActive: number,
    private readonly maxQueued: number,
  ) {}

  /** Generations waiting, all tenants together (a gauge). */
  get queued(): number {
    let n = 0;
    for (const t of this.tenants.values()) n += t.waiting.length;
    return n;
  }

  /**
   * Resolves with a release function once the tenant has a free slot (call it exactly once), or
   * rejects: 429 when the tenant's queue is full, or when `signal` aborts while waiting (the
   * client left; the request leaves the queue).
   */
  acquire(tenantId: string, signal?: AbortSignal): Promise<() => void> {
    const t = this.state(tenantId);
    if (t.active < this.maxActive) {
      t.active++;
      return Promise.resolve(this.releaser(tenantId, t));
    }
    if (t.waiting.length >= this.maxQueued) {
      this.forget(tenantId, t);
      return Promise.reject(tenantQueueFull({ limit: this.maxActive, queued: this.maxQueued }, undefined, { retryAfterSeconds: 1 }));
    }
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = t.waiting.indexOf(waiter);
        if (i >= 0) t.waiting.splice(i, 1);
        this.forget(tenantId, t);
        reject(clientDisconnectedWhileQueued());
      };
      const waiter: Waiter = {
        admit: (release) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(release);
        },
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      t.waiting.push(waiter);
    });
  }

  private state(tenantId: string): TenantState {
    let t = this.tenants.get(tenantId);
    if (!t) this.tenants.set(tenantId, (t = { active: 0, waiting: [] }));
    return t;
  }

  private forget(tenantId: string, t: TenantState): void {
    if (t.active === 0 && t.waiting.length === 0) this.tenants.delete(tenantId);
  }

  private releaser(tenantId: string, t: TenantState): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = t.waiting.shift();
      // the slot passes straight to the tenant's next waiter, so no newcomer can jump the queue
      if (next) next.admit(this.releaser(tenantId, t));
      else {
        t.active--;
        this.forget(tenantId, t);
      }
    };
  }
}
