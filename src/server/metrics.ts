import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats } from '../engine/protocol.ts';

/** Prometheus metrics of one server process. */
export class ServerMetrics {
  readonly registry = new Registry();
  readonly requests = new Counter({ name: 'reft_http_requests_total', help: 'HTTP requests by route and status', labelNames: ['method', 'route', 'status'], registers: [this.registry] });
  readonly latency = new Histogram({
    name: 'reft_http_request_duration_seconds', help: 'HTTP request latency', labelNames: ['method', 'route'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], registers: [this.registry],
  });
  readonly timeToFirstToken = new Histogram({
    name: 'reft_time_to_first_token_seconds', help: 'Time from request to first generated token',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [this.registry],
  });
  readonly tokensPerSecond = new Histogram({
    name: 'reft_generation_tokens_per_second', help: 'Decode speed of each finished generation',
    buckets: [1, 2, 5, 10, 20, 30, 50, 100, 200, 500], registers: [this.registry],
  });
  readonly generatedTokens = new Counter({ name: 'reft_generated_tokens_total', help: 'Tokens generated', registers: [this.registry] });
  readonly promptTokens = new Counter({ name: 'reft_prompt_tokens_total', help: 'Prompt tokens processed', registers: [this.registry] });
  readonly interventionCache = new Counter({ name: 'reft_adapter_cache_total', help: 'Intervention cache lookups', labelNames: ['result'], registers: [this.registry] });

  constructor(engineStats: () => Promise<EngineStats | null>) {
    collectDefaultMetrics({ register: this.registry, prefix: 'reft_process_' });
    const stats = { current: null as EngineStats | null };
    const refresh = async () => {
      stats.current = await engineStats();
    };
    new Gauge({
      name: 'reft_batch_size', help: 'Sequences in the last decode step', registers: [this.registry],
      async collect() {
        await refresh();
        this.set(stats.current?.lastBatchSize ?? 0);
      },
    });
    new Gauge({ name: 'reft_queue_depth', help: 'Requests waiting for a batch slot', registers: [this.registry], collect() { this.set(stats.current?.queued ?? 0); } });
    new Gauge({ name: 'reft_running_sequences', help: 'Sequences in the running batch', registers: [this.registry], collect() { this.set(stats.current?.running ?? 0); } });
    new Gauge({ name: 'reft_kv_cache_bytes', help: 'Bytes held by the KV cache', registers: [this.registry], collect() { this.set(stats.current?.kvBytes ?? 0); } });
  }

  register(app: FastifyInstance): void {
    app.addHook('onResponse', async (request, reply) => {
      const route = request.routeOptions.url ?? 'unmatched';
      this.requests.inc({ method: request.method, route, status: String(reply.statusCode) });
      this.latency.observe({ method: request.method, route }, reply.elapsedTime / 1000);
    });
  }
}
