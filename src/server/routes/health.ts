import type { FastifyInstance } from 'fastify';
import { metricsKeyRequired } from '../../errors.ts';
import { sameSecret } from '../auth.ts';
import type { Placement } from '../../runtime/device.ts';
import type { ServerMetrics } from '../metrics.ts';

/** Liveness, readiness (model loaded, not draining) and Prometheus metrics; no auth. */
export function healthRoutes(
  app: FastifyInstance,
  metrics: ServerMetrics,
  ready: () => { ready: boolean; reason: string; placement?: Placement },
  metricsKey: string | null = null,
): void {
  const config = { auth: 'none' as const };
  app.get('/healthz', { config, schema: { summary: 'Liveness', tags: ['health'] } }, async () => ({ status: 'ok' }));
  app.get(
    '/readyz',
    { config, schema: { summary: 'Readiness: the model is loaded and the server takes requests', tags: ['health'] } },
    async (_request, reply) => {
      const r = ready();
      // which device and adapter serve, once the model is loaded
      return reply.status(r.ready ? 200 : 503).send({ status: r.ready ? 'ready' : 'not ready', reason: r.reason, ...r.placement });
    },
  );
  // every tenant's traffic is in the metrics: with REFT_METRICS_KEY set, only its holder reads them
  app.get(
    '/metrics',
    { config, schema: { summary: 'Prometheus metrics (Bearer REFT_METRICS_KEY when the server has one)', tags: ['health'], hide: false } },
    async (request, reply) => {
      if (metricsKey !== null && !sameSecret(request.headers.authorization?.replace(/^Bearer\s+/i, '') ?? '', metricsKey)) {
        throw metricsKeyRequired('authorization');
      }
      return reply.type(metrics.registry.contentType).send(await metrics.registry.metrics());
    },
  );
}
