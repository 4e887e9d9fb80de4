import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats } from '../engine/worker-messages.ts';
import type { GrammarStats } from '../grammar/service.ts';
import { PREFIX_BLOCK_TOKENS } from '../prefix-cache/block-keys.ts';

/** Prometheus metrics of one server process. */
export class ServerMetrics {
  readonly registry = new Registry();
  readonly requests = new Counter({
    name: 'reft_http_requests_total',
    help: 'HTTP requests by route and status',
    labelNames: ['method', 'route', 'status'],
    registers: [this.registry],
  });
  readonly latency = new Histogram({
    name: 'reft_http_request_duration_seconds',
    help: 'HTTP request latency',
    labelNames: ['method', 'route'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [this.registry],
  });
  readonly timeToFirstToken = new Histogram({
    name: 'reft_time_to_first_token_seconds',
    help: 'Time from request to first generated token',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  readonly tokensPerSecond = new Histogram({
    name: 'reft_generation_tokens_per_second',
    help: 'Decode speed of each finished generation',
    buckets: [1, 2, 5, 10, 20, 30, 50, 100, 200, 500],
    registers: [this.registry],
  });
  readonly generatedTokens = new Counter({ name: 'reft_generated_tokens_total', help: 'Tokens generated', registers: [this.registry] });
  readonly promptTokens = new Counter({ name: 'reft_prompt_tokens_total', help: 'Prompt tokens processed', registers: [this.registry] });
  readonly prefixCacheTokens = new Counter({
    name: 'reft_prefix_cache_prompt_tokens_total',
    help: 'Prompt tokens of finished generations by where their keys and values came from: the prefix cache (cached) or a prefill (computed)',
    labelNames: ['source'],
    registers: [this.registry],
  });
  readonly prefixCacheHits = new Counter({
    name: 'reft_prefix_cache_hits_total',
    help: 'Generations whose prompt started with blocks from the prefix cache',
    registers: [this.registry],
  });
  readonly interventionCache = new Counter({
    name: 'reft_adapter_cache_total',
    help: 'Intervention cache lookups',
    labelNames: ['result'],
    registers: [this.registry],
  });

  readonly device = new Gauge({
    name: 'reft_device_info',
    help: 'The device the engine runs on (cpu, webgpu, cuda) and its adapter; 1 once the model is loaded',
    labelNames: ['device', 'adapter'],
    registers: [this.registry],
  });

  /** `jobCounts`: the store's training jobs per status (of every tenant), read at each scrape. */
  constructor(engineStats: () => Promise<EngineStats | null>, jobCounts: () => Promise<Record<string, number>>) {
    // prom-client names its defaults process_* and nodejs_*: the prefix makes them reft_process_*
    collectDefaultMetrics({ register: this.registry, prefix: 'reft_' });
    // One engine read per scrape, shared by every engine gauge: the registry collects them all at
    // once, so each awaits the same read rather than showing the previous scrape's numbers.
    let pending: Promise<EngineStats | null> | null = null;
    const current = () => (pending ??= engineStats().finally(() => setImmediate(() => (pending = null))));
    const engineGauge = (name: string, help: string, value: (s: EngineStats) => number) =>
      new Gauge({
        name,
        help,
        registers: [this.registry],
        async collect() {
          const stats = await current();
          this.set(stats ? value(stats) : 0);
        },
      });
    engineGauge('reft_batch_size', 'Sequences in the last decode step', (s) => s.lastBatchSize);
    engineGauge('reft_queue_depth', 'Generation requests waiting for a batch slot', (s) => s.queued);
    engineGauge('reft_running_sequences', 'Sequences in the running batch', (s) => s.running);
    engineGauge(
      'reft_tokens_in_flight',
      'Prompt + max_new_tokens over the running sequences (bounded by --max-tokens-in-flight)',
      (s) => s.tokensInFlight,
    );
    engineGauge('reft_kv_cache_bytes', 'Bytes held by the KV cache', (s) => s.kvBytes);
    engineGauge('reft_prefix_cache_bytes', "Bytes held by the prefix cache's blocks", (s) => s.prefixCache?.bytes ?? 0);
    engineGauge(
      'reft_prefix_cache_blocks',
      `Blocks of ${PREFIX_BLOCK_TOKENS} prompt tokens the prefix cache holds`,
      (s) => s.prefixCache?.blocks ?? 0,
    );
    new Counter({
      name: 'reft_prefix_cache_evictions_total',
      help: 'Prefix-cache blocks evicted to make room',
      registers: [this.registry],
      async collect() {
        const stats = await current();
        this.reset();
        this.inc(stats?.prefixCache?.evictions ?? 0);
      },
    });
    new Gauge({
      name: 'reft_model_weight_bytes',
      help: "Bytes of the base model's weights as the engine holds them (format: f32, q8, q4)",
      labelNames: ['format'],
      registers: [this.registry],
      async collect() {
        const stats = await current();
        this.reset();
        if (stats) this.set({ format: stats.weightsFormat }, stats.weightBytes);
      },
    });
    new Gauge({
      name: 'reft_training_jobs',
      help: 'Training jobs of every tenant by status, counted in the store at scrape time',
      labelNames: ['status'],
      registers: [this.registry],
      async collect() {
        // While the store is unreachable the series are absent, rather than the scrape failing or showing stale counts.
        const counts = await jobCounts().catch(() => null);
        this.reset();
        for (const [status, n] of Object.entries(counts ?? {})) this.set({ status }, n);
      },
    });
  }

  /** The generations waiting in tenants' queues for one of their concurrent slots. */
  watchTenantQueues(queued: () => number): void {
    new Gauge({
      name: 'reft_tenant_queued_requests',
      help: "Generation requests waiting in their tenant's queue (over --tenant-max-concurrent)",
      registers: [this.registry],
      collect() {
        this.set(queued());
      },
    });
  }

  /** Structured output's grammar service (null while the model loads), read at each scrape. */
  watchGrammars(stats: () => GrammarStats | null): void {
    const series: Array<[string, string, (s: GrammarStats) => number, 'counter' | 'gauge']> = [
      ['reft_grammar_compiles_total', 'Grammars compiled (schemas, choice lists, EBNF, json_object)', (s) => s.compiles, 'counter'],
      ['reft_grammar_cache_hits_total', 'Constrained requests whose grammar was already compiled', (s) => s.cacheHits, 'counter'],
      ['reft_grammar_cached', 'Compiled grammars kept', (s) => s.cached, 'gauge'],
      ['reft_grammar_threads', 'Grammar threads running', (s) => s.threads, 'gauge'],
      ['reft_grammar_rows', 'Constrained rows with a live matcher', (s) => s.liveRows, 'gauge'],
    ];
    for (const [name, help, value, kind] of series) {
      const collect = function (this: Counter | Gauge) {
        const now = stats();
        this.reset();
        if (now) this.inc(value(now));
      };
      if (kind === 'counter') new Counter({ name, help, registers: [this.registry], collect });
      else new Gauge({ name, help, registers: [this.registry], collect });
    }
  }

  register(app: FastifyInstance): void {
    app.addHook('onResponse', async (request, reply) => {
      const route = request.routeOptions.url ?? 'unmatched';
      this.requests.inc({ method: request.method, route, status: String(reply.statusCode) });
      this.latency.observe({ method: request.method, route }, reply.elapsedTime / 1000);
    });
  }
}
