import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { ReftError } from '../errors.ts';
import type { Store, Tenant } from '../storage/store.ts';

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

function sameSecret(a: string, b: string): boolean {
  const ha = Buffer.from(hashSecret(a), 'hex');
  const hb = Buffer.from(hashSecret(b), 'hex');
  return timingSafeEqual(ha, hb);
}

export interface AuthOptions {
  store: Store;
  adminKey: string | null;
  /** The tenant open (single-tenant) mode acts as; null with API keys. */
  defaultTenant: Tenant | null;
}

export function registerAuth(app: FastifyInstance, opts: AuthOptions): void {
  app.decorateRequest('tenant', null as unknown as Tenant);
  app.addHook('onRequest', async (request) => {
    const level: AuthLevel = request.routeOptions.config?.auth ?? 'tenant';
    // an unknown route is a 404 for everyone, whatever key came with it
    if (level === 'none' || request.is404) return;
    if (!opts.adminKey) {
      if (level === 'admin') throw new ReftError('not_found', 'tenant administration is off: the server runs single-tenant (set REFT_ADMIN_KEY)');
      request.tenant = opts.defaultTenant!;
      return;
    }
    const secret = bearer(request);
    if (!secret) throw new ReftError('unauthorized', 'missing API key: send "Authorization: Bearer <key>"', 'authorization');
    if (level === 'admin') {
      if (!sameSecret(secret, opts.adminKey)) throw new ReftError('forbidden', 'this route needs the admin key', 'authorization');
      return;
    }
    const found = await opts.store.findApiKey(hashSecret(secret));
    if (!found) {
      if (sameSecret(secret, opts.adminKey)) throw new ReftError('forbidden', 'this route needs a tenant API key; the admin key only administers tenants (/v1/admin)', 'authorization');
      throw new ReftError('unauthorized', 'invalid or revoked API key', 'authorization');
    }
    request.tenant = found.tenant;
  });
}
