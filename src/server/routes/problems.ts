import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { AREAS, catalogue, declarationOf, problemTypeNotFound, type ErrorDeclaration } from '../../errors.ts';
import { problemSchema } from './schemas.ts';

/**
 * The error catalogue, served: every problem `type` is `/problems/{code}`, so it resolves against
 * the server that sent it to the entry that describes it. Open without a key, like /docs.
 */
const entrySchema = z
  .object({
    code: z.string(),
    title: z.string(),
    status: z.number().int(),
    category: z.string(),
    area: z.string().describe('request, model, interventions, training, tenants, storage, server, or generic'),
    type: z.string(),
  })
  .describe('One error the server can answer with');

const AREA_OF = new Map<string, string>(
  Object.entries(AREAS).flatMap(([area, entries]) =>
    Object.values(entries as Record<string, { code?: unknown }>).flatMap((e) => (typeof e.code === 'string' ? [[e.code, area]] : [])),
  ),
);

const entryOf = (d: ErrorDeclaration): z.infer<typeof entrySchema> => ({
  code: d.code,
  title: d.title,
  status: d.status,
  category: d.category,
  area: AREA_OF.get(d.code) ?? 'generic',
  type: d.type,
});

export function problemRoutes(app: FastifyInstance): void {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const config = { auth: 'none' as const };
  const tags = ['problems'];
  r.get(
    '/problems',
    {
      config,
      schema: { summary: 'The error catalogue: every code, its status and category', tags, response: { 200: z.array(entrySchema) } },
    },
    async () => catalogue().map(entryOf),
  );
  r.get(
    '/problems/:code',
    {
      config,
      schema: {
        summary: "One error's entry (a problem's `type` points here)",
        tags,
        params: z.object({ code: z.string().max(100) }),
        response: { 200: entrySchema, '4xx': problemSchema },
      },
    },
    async (request) => {
      const d = declarationOf(request.params.code);
      if (!d) throw problemTypeNotFound({ code: request.params.code }, 'code');
      return entryOf(d);
    },
  );
}
