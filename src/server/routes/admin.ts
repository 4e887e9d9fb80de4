import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { keyNotFound, tenantNotFound } from '../../errors.ts';
import type { Store } from '../../storage/store.ts';
import { hashSecret, newApiKeySecret } from '../auth.ts';
import { idParam, pageQuery, pageSchema, problemSchema } from './schemas.ts';

/** Tenant and key management, behind the admin key. */
const tenantSchema = z.object({ id: z.string(), name: z.string(), created_at: z.string() });

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
        body: z.strictObject({ name: z.string().min(1).max(200) }),
        response: { 201: tenantSchema, '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const t = await store.createTenant(request.body.name);
      request.log.info({ tenant: t.id }, 'tenant created');
      return reply.status(201).send({ id: t.id, name: t.name, created_at: t.createdAt });
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
      return {
        object: 'list' as const,
        data: page.data.map((t) => ({ id: t.id, name: t.name, created_at: t.createdAt })),
        has_more: page.nextCursor !== null,
        next_cursor: page.nextCursor,
      };
    },
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
          201: z.object({ id: z.string(), tenant_id: z.string(), key: z.string(), created_at: z.string() }),
          '4xx': problemSchema,
        },
      },
    },
    async (request, reply) => {
      const tenant = await store.getTenant(request.params.id);
      if (!tenant) throw tenantNotFound({ id: request.params.id }, 'id');
      const secret = newApiKeySecret();
      const key = await store.createApiKey(tenant.id, hashSecret(secret));
      request.log.info({ tenant: tenant.id, key: key.id }, 'api key created');
      return reply.status(201).send({ id: key.id, tenant_id: tenant.id, key: secret, created_at: key.createdAt });
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
