import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { modelNotFound } from '../../../errors.ts';
import type { Composition, InterventionMeta, Store, Tenant } from '../../../storage/store.ts';
import type { GenerationService } from '../../generation-service.ts';
import { modelList, modelSchema, openaiRoute, type ModelEntry } from './schemas.ts';

/** GET /v1/models and /v1/models/{name}: the base model, then the interventions and compositions the caller can use. */
export function modelsRoutes(app: FastifyInstance, service: GenerationService, store: Store): void {
  const r = app.withTypeProvider<ZodTypeProvider>();

  const baseModel = (): ModelEntry => {
    const rt = service.model;
    return {
      id: rt.name,
      object: 'model',
      created: 0,
      owned_by: 'reft-server',
      root: rt.name,
      parent: null,
      max_model_len: rt.config.maxPositions,
      weights: { format: rt.engine.weights.format, bytes: rt.engine.weights.bytes },
    };
  };
  const interventionModel = (iv: InterventionMeta): ModelEntry => ({
    id: iv.name,
    object: 'model',
    created: Math.floor(Date.parse(iv.createdAt) / 1000),
    owned_by: iv.tenantId ? 'tenant' : 'shared',
    root: iv.id,
    parent: service.model.name,
  });

  const compositionModel = (c: Composition): ModelEntry => ({
    id: c.name,
    object: 'model',
    created: Math.floor(Date.parse(c.createdAt) / 1000),
    owned_by: 'tenant',
    root: c.id,
    parent: service.model.name,
  });

  r.get(
    '/v1/models',
    openaiRoute('The base model, then the interventions and compositions the caller can use, by name', modelList, {}),
    async (request) => {
      const data = [baseModel()];
      let after: string | undefined;
      do {
        const page = await store.listInterventions(request.tenant.id, { limit: 100, after });
        data.push(...page.data.map(interventionModel));
        after = page.nextCursor ?? undefined;
      } while (after && data.length < 10_000);
      let next: string | undefined;
      do {
        const page = await store.listCompositions(request.tenant.id, { limit: 100, after: next });
        data.push(...page.data.map(compositionModel));
        next = page.nextCursor ?? undefined;
      } while (next && data.length < 20_000);
      return { object: 'list' as const, data };
    },
  );

  // the base model's name may hold slashes (a hub repo id), hence the wildcard
  r.get(
    '/v1/models/*',
    openaiRoute('One model: the base model, or an intervention or composition by name or id', modelSchema, {
      params: z.object({ '*': z.string().min(1).max(400).describe('model name') }),
    }),
    async (request) => modelByName(request.params['*'], request.tenant),
  );

  async function modelByName(name: string, tenant: Tenant): Promise<ModelEntry> {
    if (name === service.model.name) return baseModel();
    const iv = await store.findIntervention(tenant.id, name);
    if (iv) return interventionModel(iv);
    const composition = await store.findComposition(tenant.id, name);
    if (!composition) throw modelNotFound({ id: name }, 'model');
    return compositionModel(composition);
  }
}
