import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { keyNotFound, tenantNotFound } from '../../errors.ts';
import type { Store, Tenant } from '../../storage/store.ts';
import { hashSecret, newApiKeySecret } from '../auth.ts';
import { idParam, pageBody, pageQuery, pageSchema, problemSchema } from './schemas.ts';
import { usageQuery, usageReport, usageSchema } from './usage.ts';

/** Tenant and key management, behind the admin key. */
const tenantSchema = z.object({ id: z.string(), name: z.string(), created_at: z.string() });
const tenantName = z.strictObject({ name: z.string().min(1).max(200) });
const tenantJson = (t: Tenant) => ({ id: t.id, name: t.name, created_at: t.createdAt });
const keySchema = z.object({
  id: z.string(),
  tenant_id: z.string(),
  prefix: z.string().nullable().describe("the secret's first characters, to tell keys apart (null for keys made before they were kept)"),
  created_at: z.string(),
  last_used_at: z.string().nullable().describe('to the minute'),
  revoked_at: z.string().nullable(),
});
/** Characters of a secret kept to tell keys apart: "rft_" and 8 of its 43 random ones (48 of 256 bits). */
const KEY_PREFIX_CHARS = 12;

export function adminRoutes(app: FastifyInstance, store: Store): void {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const config = { auth: 'admin' as const };

  r.post(
    '/v1/admin/tenants',
    {
      config,
      schema: {
        summary: 'Create a tenant',
        tags: ['admin'],
        description: 'Tenant names are unique: a taken one is a 409.',
        body: tenantName,
        response: { 201: tenantSchema, '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const t = await store.createTenant(request.body.name);
      request.log.info({ tenant: t.id }, 'tenant created');
      return reply.status(201).send(tenantJson(t));
    },
  );

  r.get(
    '/v1/admin/tenants',
    {
      config,
      schema: {
        summary: 'List tenants',
        tags: ['admin'],
        querystring: pageQuery,
        response: { 200: pageSchema(tenantSchema), '4xx': problemSchema },
      },
    },
    async (request) => {
      const page = await store.listTenants(request.query);
      return pageBody(page, tenantJson);
    },
  );

  const tenantParams = z.strictObject({ id: idParam });
  const found = async (id: string) => (await store.getTenant(id)) ?? Promise.reject(tenantNotFound({ id }, 'id'));

  r.get(
    '/v1/admin/tenants/:id',
    {
      config,
      schema: { summary: 'Get a tenant', tags: ['admin'], params: tenantParams, response: { 200: tenantSchema, '4xx': problemSchema } },
    },
    async (request) => tenantJson(await found(request.params.id)),
  );

  r.patch(
    '/v1/admin/tenants/:id',
    {
      config,
      schema: {
        summary: 'Rename a tenant (409 if the name is taken)',
        tags: ['admin'],
        params: tenantParams,
        body: tenantName,
        response: { 200: tenantSchema, '4xx': problemSchema },
      },
    },
    async (request) => {
      const t = await store.renameTenant(request.params.id, request.body.name);
      if (!t) throw tenantNotFound({ id: request.params.id }, 'id');
      request.log.info({ tenant: t.id }, 'tenant renamed');
      return tenantJson(t);
    },
  );

  r.delete(
    '/v1/admin/tenants/:id',
    {
      config,
      schema: {
        summary: 'Delete a tenant: its keys stop working at once; its interventions, files, jobs and usage are removed',
        tags: ['admin'],
        params: tenantParams,
        response: { 204: z.null(), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      if (!(await store.deleteTenant(request.params.id))) throw tenantNotFound({ id: request.params.id }, 'id');
      request.log.info({ tenant: request.params.id }, 'tenant deleted');
      return reply.status(204).send(null);
    },
  );

  r.get(
    '/v1/admin/tenants/:id/keys',
    {
      config,
      schema: {
        summary: "List a tenant's API keys, revoked ones too, oldest first (never their secrets)",
        tags: ['admin'],
        params: tenantParams,
        response: { 200: z.object({ object: z.literal('list'), data: z.array(keySchema) }), '4xx': problemSchema },
      },
    },
    async (request) => {
      const tenant = await found(request.params.id);
      const keys = await store.listApiKeys(tenant.id);
      const data = keys.map((k) => ({
        id: k.id,
        tenant_id: k.tenantId,
        prefix: k.prefix,
        created_at: k.createdAt,
        last_used_at: k.lastUsedAt,
        revoked_at: k.revokedAt,
      }));
      return { object: 'list' as const, data };
    },
  );

  r.get(
    '/v1/admin/tenants/:id/usage',
    {
      config,
      schema: {
        summary: "A tenant's usage by day (UTC), as it sees it at /v1/usage",
        tags: ['admin'],
        params: tenantParams,
        querystring: usageQuery,
        response: { 200: usageSchema, '4xx': problemSchema },
      },
    },
    async (request) => usageReport(store, (await found(request.params.id)).id, request.query),
  );

  r.post(
    '/v1/admin/tenants/:id/keys',
    {
      config,
      schema: {
        summary: 'Create an API key for a tenant; the secret is shown only in this response',
        tags: ['admin'],
        params: z.strictObject({ id: idParam }),
        response: {
          201: z.object({ id: z.string(), tenant_id: z.string(), key: z.string(), prefix: z.string(), created_at: z.string() }),
          '4xx': problemSchema,
        },
      },
    },
    async (request, reply) => {
      const tenant = await found(request.params.id);
      const secret = newApiKeySecret();
      const key = await store.createApiKey(tenant.id, hashSecret(secret), secret.slice(0, KEY_PREFIX_CHARS));
      request.log.info({ tenant: tenant.id, key: key.id }, 'api key created');
      return reply.status(201).send({ id: key.id, tenant_id: tenant.id, key: secret, prefix: key.prefix!, created_at: key.createdAt });
    },
  );

  r.delete(
    '/v1/admin/keys/:id',
    {
      config,
      schema: {
        summary: 'Revoke an API key (effective at once)',
        tags: ['admin'],
        params: z.strictObject({ id: idParam }),
        response: { 204: z.null(), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      if (!(await store.revokeApiKey(request.params.id))) throw keyNotFound({ id: request.params.id }, 'id');
      request.log.info({ key: request.params.id }, 'api key revoked');
      return reply.status(204).send(null);
    },
  );
}
