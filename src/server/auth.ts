import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { adminKeyRequired, adminOff, apiKeyInvalid, apiKeyMissing, failedKeysRateLimited, tenantKeyRequired } from '../errors.ts';
import type { Store, Tenant } from '../storage/store.ts';
import { LRUCache } from 'lru-cache';

/**
 * Bearer API keys. Every key belongs to a tenant and is stored only as its SHA-256 (keys are
 * 32 random bytes, so a fast hash is enough: there is nothing to brute-force). The admin key
 * comes from the environment. With no admin key the server is single-tenant and open, and
 * every request acts as the default tenant.
 */
export type AuthLevel = 'none' | 'tenant' | 'admin';

declare module 'fastify' {
  interface FastifyRequest {
    tenant: Tenant;
  }
  interface FastifyContextConfig {
    auth?: AuthLevel;
  }
}

export const DEFAULT_TENANT_NAME = 'default';

export function hashSecret(secret: string): string {
  return createHash('sha256').update(secret).digest('hex');
}

export function newApiKeySecret(): string {
  return `rft_${randomBytes(32).toString('base64url')}`;
}

function bearer(request: FastifyRequest): string | null {
  const h = request.headers.authorization;
  if (!h) return null;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(h);
  return m ? m[1] : null;
}

export function sameSecret(a: string, b: string): boolean {
  const ha = Buffer.from(hashSecret(a), 'hex');
  const hb = Buffer.from(hashSecret(b), 'hex');
  return timingSafeEqual(ha, hb);
}

/** A key's last use is written at most this often per process: not a write per request. */
const KEY_TOUCH_MS = 60_000;

/** Failed keys one address may send in a window before it is refused without a lookup. */
export const MAX_FAILED_KEYS = 10;
const FAILED_KEY_WINDOW_MS = 60_000;

/**
 * Counts failed keys per client address, so guessing keys (or hammering the key lookup) is slowed
 * to MAX_FAILED_KEYS a minute. Bounded: the least recent addresses are forgotten first.
 */
class FailedKeys {
  private readonly failures = new LRUCache<string, { count: number; until: number }>({ max: 100_000 });

  /** Seconds until this address may try again, or 0. */
  blockedFor(address: string): number {
    const f = this.failures.get(address);
    if (!f || f.count < MAX_FAILED_KEYS) return 0;
    const left = f.until - Date.now();
    if (left <= 0) {
      this.failures.delete(address);
      return 0;
    }
    return Math.ceil(left / 1000);
  }

  record(address: string): void {
    const now = Date.now();
    const f = this.failures.get(address);
    if (!f || f.until <= now) this.failures.set(address, { count: 1, until: now + FAILED_KEY_WINDOW_MS });
    else f.count++;
  }
}

export interface AuthOptions {
  store: Store;
  adminKey: string | null;
  /** The tenant open (single-tenant) mode acts as; null with API keys. */
  defaultTenant: Tenant | null;
}

export function registerAuth(app: FastifyInstance, opts: AuthOptions): void {
  app.decorateRequest('tenant', null as unknown as Tenant);
  const failed = new FailedKeys();
  const touched = new LRUCache<string, true>({ max: 100_000, ttl: KEY_TOUCH_MS });
  app.addHook('onRequest', async (request) => {
    const level: AuthLevel = request.routeOptions.config?.auth ?? 'tenant';
    // an unknown route is a 404 for everyone, whatever key came with it
    if (level === 'none' || request.is404) return;
    if (!opts.adminKey) {
      if (level === 'admin') throw adminOff();
      request.tenant = opts.defaultTenant!;
      return;
    }
    const secret = bearer(request);
    if (!secret) throw apiKeyMissing('authorization');
    const wait = failed.blockedFor(request.ip);
    if (wait > 0) throw failedKeysRateLimited({ limit: MAX_FAILED_KEYS }, 'authorization', { retryAfterSeconds: wait });
    if (level === 'admin') {
      if (!sameSecret(secret, opts.adminKey)) {
        failed.record(request.ip);
        throw adminKeyRequired('authorization');
      }
      return;
    }
    const found = await opts.store.findApiKey(hashSecret(secret));
    if (!found) {
      if (sameSecret(secret, opts.adminKey)) throw tenantKeyRequired('authorization');
      failed.record(request.ip);
      throw apiKeyInvalid('authorization');
    }
    request.tenant = found.tenant;
    if (!touched.has(found.key.id)) {
      touched.set(found.key.id, true);
      // Not awaited: the request needn't wait for bookkeeping, nor fail with it.
      opts.store.touchApiKey(found.key.id).catch((e: Error) => request.log.warn({ err: e }, 'could not record an API key use'));
    }
  });
}
