import type { Store, Tenant } from '../storage/store.ts';
import { buildApp } from './app.ts';
import { DEFAULT_TENANT_LIMITS } from './tenant-limits.ts';

/**
 * The OpenAPI document, generated from the route schemas (no model needed). It is committed as
 * openapi/openapi.json and a test fails when it is stale.
 */
export async function openapiDocument(store: Store): Promise<string> {
  const tenant: Tenant = { id: 'ten_openapi', name: 'openapi', createdAt: new Date(0).toISOString() };
  const { app } = await buildApp({
    store,
    adminKey: null,
    defaultTenant: tenant,
    tenantLimits: DEFAULT_TENANT_LIMITS,
    bodyLimit: 1024 ** 2,
    uploadLimit: 1024 ** 2,
    logger: null,
    runtime: () => null,
    notReadyReason: () => 'openapi',
  });
  await app.ready();
  const doc = JSON.stringify(app.swagger(), null, 2) + '\n';
  await app.close();
  return doc;
}
