import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { compositionNameTaken, compositionNotFound, interventionNameTaken, quotaCompositions } from '../../errors.ts';
import type { Composition, Store } from '../../storage/store.ts';
import type { SteeringResolver } from '../steering.ts';
import type { TenantLimits } from '../tenant-limits.ts';
import { idParam, pageBody, pageQuery, pageSchema, problemSchema } from './schemas.ts';
import { steerItemSchema, steerListSchema } from './steer-schemas.ts';

/**
 * Saved compositions: a named list of stored interventions with their settings, usable wherever
 * an intervention id or name is (`adapter`, OpenAI `model`), tenant-scoped like interventions.
 * Items name artifacts by id once saved; a composition never holds another composition.
 */
export const compositionSchema = z.object({
  id: z.string(),
  object: z.literal('composition'),
  name: z.string(),
  interventions: z.array(steerItemSchema.describe('an item; `intervention` is the stored intervention id')),
  created_at: z.string(),
  updated_at: z.string(),
});

const compositionBody = z.strictObject({
  name: idParam.describe('composition name: letters, digits, "_", "." or "-"; not an intervention\'s name'),
  interventions: steerListSchema,
  replace: z.boolean().default(false).describe('replace the composition of this name if there is one'),
});

export function compositionView(c: Composition): z.infer<typeof compositionSchema> {
  return {
    id: c.id,
    object: 'composition',
    name: c.name,
    interventions: c.items.map((it) => ({
      intervention: it.intervention,
      ...(it.strength !== undefined ? { strength: it.strength } : {}),
      ...(it.layers !== undefined ? { layers: it.layers } : {}),
      ...(it.positions !== undefined ? { positions: it.positions } : {}),
    })),
    created_at: c.createdAt,
    updated_at: c.updatedAt,
  };
}

export interface CompositionRouteDeps {
  store: Store;
  steering: SteeringResolver;
  limits: TenantLimits;
}

/** Compositions a tenant holds, counted up to `limit` (past it the count stops mattering). */
async function countCompositions(store: Store, tenantId: string, limit: number): Promise<number> {
  let count = 0;
  let after: string | undefined;
  do {
    const page = await store.listCompositions(tenantId, { limit: 100, after });
    count += page.data.length;
    after = page.nextCursor ?? undefined;
  } while (after && count < limit);
  return count;
}

export function compositionRoutes(app: FastifyInstance, deps: CompositionRouteDeps): void {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const { store } = deps;
  const params = z.strictObject({ id: idParam });

  r.post(
    '/v1/compositions',
    {
      schema: {
        summary: 'Save a composition: a named list of stored interventions, each with its strength, layers and positions',
        tags: ['compositions'],
        body: compositionBody,
        response: { 200: compositionSchema, 201: compositionSchema, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) => {
      const tenantId = request.tenant.id;
      const { name, interventions, replace } = request.body;
      const existing = await store.findComposition(tenantId, name);
      const replaceId = existing?.name === name ? existing.id : undefined;
      if (replaceId && !replace) throw compositionNameTaken({ name }, 'name');
      // an intervention's name would win when a request names it: refuse the shadowed name
      if (await store.findIntervention(tenantId, name))
        throw interventionNameTaken({ name, hint: 'a composition cannot take the name of an intervention' }, 'name');
      if (!replaceId) {
        const stored = await countCompositions(store, tenantId, deps.limits.maxInterventions);
        if (stored >= deps.limits.maxInterventions) throw quotaCompositions({ stored, limit: deps.limits.maxInterventions }, 'name');
      }
      // every item is checked as a request's would be (artifact found, layers its own, positions)
      const resolved = await deps.steering.resolveItems(tenantId, interventions, (i) => (key) => `interventions.${i}.${key}`);
      const items = interventions.map((it, i) => ({ ...it, intervention: resolved.ids[i] }));
      const saved = await store.putComposition({ tenantId, name, items }, replaceId);
      request.log.info({ composition: saved.id, tenant: tenantId, replaced: !!replaceId }, 'composition stored');
      return reply.status(replaceId ? 200 : 201).send(compositionView(saved));
    },
  );

  r.get(
    '/v1/compositions',
    {
      schema: {
        summary: "List the caller's compositions",
        tags: ['compositions'],
        querystring: pageQuery,
        response: { 200: pageSchema(compositionSchema), '4xx': problemSchema },
      },
    },
    async (request) => {
      const page = await store.listCompositions(request.tenant.id, request.query);
      return pageBody(page, compositionView);
    },
  );

  r.get(
    '/v1/compositions/:id',
    {
      schema: {
        summary: 'A composition by id or name',
        tags: ['compositions'],
        params,
        response: { 200: compositionSchema, '4xx': problemSchema },
      },
    },
    async (request) => {
      const c = await store.findComposition(request.tenant.id, request.params.id);
      if (!c) throw compositionNotFound({ id: request.params.id }, 'id');
      return compositionView(c);
    },
  );

  r.delete(
    '/v1/compositions/:id',
    {
      schema: {
        summary: "Delete one of the caller's compositions (the interventions it uses stay)",
        tags: ['compositions'],
        params,
        response: { 204: z.null(), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const c = await store.findComposition(request.tenant.id, request.params.id);
      if (!c || !(await store.deleteComposition(request.tenant.id, c.id))) throw compositionNotFound({ id: request.params.id }, 'id');
      request.log.info({ composition: c.id, tenant: request.tenant.id }, 'composition deleted');
      return reply.status(204).send(null);
    },
  );
}
