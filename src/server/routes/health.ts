import type { FastifyInstance } from 'fastify';
import type { ServerMetrics } from '../metrics.ts';

/** Liveness, readiness (model loaded, not draining) and Prometheus metrics; no auth. */
export function healthRoutes(app: FastifyInstance, metrics: ServerMetrics, ready: () => { ready: boolean; reason: string }): void {
  const config = { auth: 'none' as const };
  app.get('/healthz', { config, schema: { summary: 'Liveness', tags: ['health'] } }, async () => ({ status: 'ok' }));
  app.get('/readyz', { config, schema: { summary: 'Readiness: the model is loaded and the server takes requests', tags: ['health'] } }, async (_request, reply) => {
    const r = ready();
    return reply.status(r.ready ? 200 : 503).send({ status: r.ready ? 'ready' : 'not ready', reason: r.reason });
  });
  app.get('/metrics', { config, schema: { summary: 'Prometheus metrics', tags: ['health'], hide: false } }, async (_request, reply) =>
    reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()),
  );
}
