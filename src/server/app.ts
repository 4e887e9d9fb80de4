import multipart from '@fastify/multipart';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { jsonSchemaTransform, serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import type { EngineStats } from '../engine/worker-messages.ts';
import type { Store, Tenant } from '../storage/store.ts';
import { registerAuth } from './auth.ts';
import { ServerMetrics } from './metrics.ts';
import { completeOpenapi } from './openapi-docs.ts';
import { registerProblemHandlers } from './problem.ts';
import { adminRoutes } from './routes/admin.ts';
import { generateRoutes } from './routes/generate.ts';
import { healthRoutes } from './routes/health.ts';
import { problemRoutes } from './routes/problems.ts';
import { interventionRoutes } from './routes/interventions.ts';
import { compositionRoutes } from './routes/compositions.ts';
import { openaiRoutes } from './routes/openai/index.ts';
import { pyreftImportRoutes } from './routes/pyreft-import.ts';
import { fileRoutes } from './routes/files.ts';
import { tokenizeRoutes } from './routes/tokenize.ts';
import { trainingRoutes } from './routes/training.ts';
import { usageRoutes } from './routes/usage.ts';
import { UsageMeter } from './usage.ts';
import { webUiRoutes } from './web-ui.ts';
import { GenerationService } from './generation-service.ts';
import { SteeringResolver } from './steering.ts';
import { notReady, type ModelRuntime } from './runtime.ts';
import type { TenantLimits } from './tenant-limits.ts';
import { TenantQueues } from './tenant-queue.ts';
import { MAX_JSON_DEPTH, jsonDepth } from '../limits/json-depth.ts';
import { registerJsonBodyParser } from './json-body.ts';
import { bodyTooDeep } from '../errors.ts';
import { DEFAULT_MAX_TRAINING_CHARS, DEFAULT_MAX_TRAINING_ROWS } from '../jobs/data.ts';

/**
 * The HTTP application: plugins and routes over the store and the model runtime. The runtime
 * arrives once the model is loaded; until then health routes answer and the rest get 503.
 */
export interface AppOptions {
  store: Store;
  adminKey: string | null;
  /** Bearer key /metrics asks for; null or absent: open. */
  metricsKey?: string | null;
  /** The tenant every request acts as when there are no API keys (single-tenant mode); null with keys. */
  defaultTenant: Tenant | null;
  tenantLimits: TenantLimits;
  /** Largest JSON body (bytes). */
  bodyLimit: number;
  /** Largest uploaded file (bytes). */
  uploadLimit: number;
  /** Text bounds checked before anything is tokenized. */
  inputBudgets?: InputBudgets;
  /** A pino logger, or null for none. */
  logger: FastifyBaseLogger | null;
  runtime: () => ModelRuntime | null;
  /** Why the server isn't ready (draining, loading), or null when ready. */
  notReadyReason: () => string | null;
  /** How often metered usage is written to the store. */
  usageFlushMs?: number;
  /** The built web playground served at / and /ui/ (default dist/web); null: none. */
  webUiDir?: string | null;
}

export interface InputBudgets {
  /** Characters per prompt; null: 16 × the model's context length. */
  maxPromptChars: number | null;
  /** Characters of training text per job or file. */
  maxTrainingChars: number;
  /** Rows per training file or job. */
  maxTrainingRows: number;
  /** Bytes one training pass may hold (see training/memory.ts): a job whose longest row exceeds it is refused. */
  trainMemoryBudget?: number;
}

export const API_VERSION = '0.1.0';

export async function buildApp(opts: AppOptions): Promise<{ app: FastifyInstance; metrics: ServerMetrics }> {
  const app = Fastify({
    ...(opts.logger ? { loggerInstance: opts.logger } : { logger: false }),
    bodyLimit: opts.bodyLimit,
    // ids in logs let an operator follow one request across lines
    requestIdHeader: 'x-request-id',
    genReqId: () => crypto.randomUUID(),
    ajv: { customOptions: { coerceTypes: false } },
  });
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);

  const runtime = (): ModelRuntime => {
    const rt = opts.runtime();
    if (!rt) throw notReady();
    return rt;
  };
  const metrics = new ServerMetrics(
    async (): Promise<EngineStats | null> => opts.runtime()?.engine.stats() ?? null,
    () => opts.store.countJobs(),
  );

  // routes that need no key: no lock in the document
  const openRoutes = new Set<string>();
  app.addHook('onRoute', (route) => {
    if (route.url.startsWith('/docs') || route.url === '/openapi.json') route.config = { ...(route.config ?? {}), auth: 'none' };
    if (route.config?.auth === 'none') {
      for (const m of [route.method].flat()) openRoutes.add(`${m} ${route.url.replace(/:(\w+)/g, '{$1}')}`);
    }
  });
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: 'reft-server', version: API_VERSION, description: 'Serve and train ReFT interventions on a frozen language model.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
    transformObject: (d) => completeOpenapi('openapiObject' in d ? d.openapiObject : d.swaggerObject, openRoutes),
  });
  await app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { docExpansion: 'list' } });
  // the document itself needs no key: a browser opening /docs can't send a Bearer header
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  await app.register(multipart, { limits: { fileSize: opts.uploadLimit, files: 1, fields: 8, fieldSize: 1024 * 1024, parts: 9 } });

  registerProblemHandlers(app);
  registerJsonBodyParser(app, () => opts.runtime()?.offload ?? null);
  app.addHook('preValidation', async (request) => {
    if (request.body !== null && typeof request.body === 'object' && jsonDepth(request.body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) {
      throw bodyTooDeep({ limit: MAX_JSON_DEPTH }, 'body');
    }
  });
  registerAuth(app, { store: opts.store, adminKey: opts.adminKey, defaultTenant: opts.defaultTenant });
  metrics.register(app);

  const usage = new UsageMeter(opts.store, app.log, opts.usageFlushMs);
  app.addHook('onClose', () => usage.close());
  const budgets = opts.inputBudgets ?? {
    maxPromptChars: null,
    maxTrainingChars: DEFAULT_MAX_TRAINING_CHARS,
    maxTrainingRows: DEFAULT_MAX_TRAINING_ROWS,
  };
  const queues = new TenantQueues(opts.tenantLimits.maxConcurrentRequests, opts.tenantLimits.maxQueuedRequests);
  metrics.watchTenantQueues(() => queues.queued);
  metrics.watchGrammars(() => opts.runtime()?.grammars.stats() ?? null);
  const steering = new SteeringResolver(() => runtime().interventions, opts.store);
  const service = new GenerationService(runtime, queues, metrics, usage, steering, budgets);
  healthRoutes(
    app,
    metrics,
    () => {
      const reason = opts.notReadyReason();
      return { ready: reason === null, reason: reason ?? 'ok', placement: opts.runtime()?.placement };
    },
    opts.metricsKey ?? null,
  );
  problemRoutes(app);
  generateRoutes(app, service);
  openaiRoutes(app, service, opts.store);
  tokenizeRoutes(app, service, opts.store);
  const interventionDeps = {
    store: opts.store,
    base: () => runtime().config,
    limits: opts.tenantLimits,
    uploadLimit: opts.uploadLimit,
    offload: () => runtime().offload,
  };
  interventionRoutes(app, interventionDeps);
  compositionRoutes(app, { store: opts.store, steering, limits: opts.tenantLimits });
  pyreftImportRoutes(app, { ...interventionDeps, model: () => runtime().config });
  fileRoutes(app, opts.store, {
    uploadLimit: opts.uploadLimit,
    maxRows: budgets.maxTrainingRows,
    maxFileBytes: opts.tenantLimits.maxFileBytes,
    runtime,
  });
  trainingRoutes(app, opts.store, runtime, budgets, opts.tenantLimits);
  usageRoutes(app, opts.store);
  adminRoutes(app, opts.store);
  if (opts.webUiDir !== null) await webUiRoutes(app, opts.webUiDir);
  return { app, metrics };
}
