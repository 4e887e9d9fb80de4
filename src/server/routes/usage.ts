import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { usageRangeInvalid } from '../../errors.ts';
import type { Store } from '../../storage/store.ts';
import { utcDay } from '../../storage/usage.ts';
import { problemSchema } from './schemas.ts';

/** The caller's usage by day: requests and tokens generated, read and trained on. */
const day = z.string().regex(/^\d{4}-\d{2}-\d{2}$/, 'must be a date YYYY-MM-DD');
const row = z.object({
  day: z.string(),
  requests: z.number().int(),
  prompt_tokens: z.number().int(),
  completion_tokens: z.number().int(),
  training_tokens: z.number().int(),
});

/** The usage route's query and answer, shared with the admin's view of a tenant's usage. */
export const usageQuery = z.strictObject({ from: day.optional(), to: day.optional() });
export const usageSchema = z.object({
  object: z.literal('usage'),
  from: z.string(),
  to: z.string(),
  data: z.array(row),
  totals: row.omit({ day: true }),
});

/** A tenant's usage from `from` to `to` (default: the 30 days up to today). */
export async function usageReport(store: Store, tenantId: string, query: z.infer<typeof usageQuery>): Promise<z.infer<typeof usageSchema>> {
  const to = query.to ?? utcDay();
  const from = query.from ?? utcDay(new Date(Date.parse(to) - 29 * 86_400_000));
  if (from > to) throw usageRangeInvalid({ problem: 'from is after to' }, 'from');
  const days = await store.getUsage(tenantId, from, to);
  const data = days.map((d) => ({
    day: d.day,
    requests: d.requests,
    prompt_tokens: d.promptTokens,
    completion_tokens: d.completionTokens,
    training_tokens: d.trainingTokens,
  }));
  const sum = (k: keyof Omit<(typeof data)[number], 'day'>) => data.reduce((s, d) => s + d[k], 0);
  return {
    object: 'usage' as const,
    from,
    to,
    data,
    totals: {
      requests: sum('requests'),
      prompt_tokens: sum('prompt_tokens'),
      completion_tokens: sum('completion_tokens'),
      training_tokens: sum('training_tokens'),
    },
  };
}

export function usageRoutes(app: FastifyInstance, store: Store): void {
  app.withTypeProvider<ZodTypeProvider>().get(
    '/v1/usage',
    {
      schema: {
        summary: "The caller's usage by day (UTC), recorded within seconds of each request",
        tags: ['tenants'],
        querystring: usageQuery,
        response: { 200: usageSchema, '4xx': problemSchema },
      },
    },
    async (request) => usageReport(store, request.tenant.id, request.query),
  );
}
