import { createHash } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import pino, { type Logger } from 'pino';
import type { WorkerSupervisor } from '../jobs/supervisor.ts';
import { resolveDevice, type DeviceChoice } from '../runtime/device.ts';
import { EngineClient } from '../engine/engine-client.ts';
import type { WeightFormat } from '../quant/formats.ts';
import type { SchedulerLimits } from '../engine/scheduler.ts';
import { ReftError, adminKeyTooShort, listenWithoutKeys } from '../errors.ts';
import { parseArtifact } from '../interventions/artifact.ts';
import { InterventionCache } from '../interventions/cache.ts';
import { readArtifactFiles } from '../interventions/directory.ts';
import { loadModel } from '../model/load.ts';
import type { Store, Tenant } from '../storage/store.ts';
import { buildApp } from './app.ts';
import { DEFAULT_TENANT_NAME } from './auth.ts';
import type { ModelRuntime } from './runtime.ts';
import { describeHugePages } from '../runtime/huge-pages.ts';
import type { TenantLimits } from './tenant-limits.ts';
import { OffloadPool } from '../offload/pool.ts';
import { GrammarService } from '../grammar/service.ts';
import type { GrammarBudgets } from '../grammar/spec.ts';
import { loadGrammarVocab } from '../grammar/vocab.ts';
import type { InputBudgets } from './app.ts';

/** Everything `reft-server serve` is configured with (flags and REFT_* variables). */
export interface ServeSettings {
  /** Resolves the model spec to a local folder (downloading from the Hub when needed). */
  resolveModel: () => Promise<string>;
  /** The base model's name in the API. */
  modelName: string;
  /** Other names accepted for the base model (the --model spec as given). */
  modelAliases?: string[];
  host: string;
  port: number;
  openStore: () => Promise<Store>;
  /** Starts the training worker next to the server (null: none). */
  startWorker: ((log: Logger) => WorkerSupervisor) | null;
  adminKey: string | null;
  /** Bearer key /metrics asks for (REFT_METRICS_KEY); null: open. */
  metricsKey?: string | null;
  cacheDir: string;
  sharedInterventionsDir: string | null;
  tenantLimits: TenantLimits;
  engineLimits: SchedulerLimits;
  interventionCacheBytes: number;
  bodyLimit: number;
  uploadLimit: number;
  /** Text bounds checked before tokenizing (see jobs/data.ts and prompts/prompt-input.ts). */
  inputBudgets: InputBudgets;
  /** Structured output's budgets: schema or grammar bytes, schema depth, compile time (grammar/spec.ts). */
  grammarBudgets?: Partial<GrammarBudgets>;
  shutdownTimeoutMs: number;
  usageFlushMs: number;
  logLevel: string;
  threads?: number;
  /** Where the engine runs (default auto: CUDA, else a hardware GPU through WebGPU, else the CPU). */
  device?: DeviceChoice;
  /** Folders with CUDA's libraries (--cuda-lib-dir), loaded before ORT's CUDA provider. */
  cudaLibDirs?: readonly string[];
  /** Bytes the KV cache may hold at a step's peak in host memory (default: from the machine's memory) and on the device (WebGPU). */
  kvBudget?: number;
  deviceKvBudget?: number;
  /** Bytes the prefix cache's blocks may hold (0: off; default from the KV budget), and whether tenants share them. */
  prefixCacheBytes?: number;
  prefixCacheShared?: boolean;
  /** The base model's weights: f32, or q8/q4 quantized at load (cached under cacheDir). */
  weights?: WeightFormat;
}

const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

export interface RunningServer {
  app: FastifyInstance;
  url: string;
  /** Resolves once the model is loaded (rejects if loading failed). */
  ready: Promise<void>;
  worker: WorkerSupervisor | null;
  shutdown(reason: string): Promise<void>;
}

/** An admin key shorter than this is refused at start: it guards every tenant. */
export const MIN_ADMIN_KEY_CHARS = 32;

export async function startServer(s: ServeSettings): Promise<RunningServer> {
  if (s.adminKey && s.adminKey.length < MIN_ADMIN_KEY_CHARS) {
    throw adminKeyTooShort({ length: s.adminKey.length, min: MIN_ADMIN_KEY_CHARS }, 'REFT_ADMIN_KEY');
  }
  if (!s.adminKey && !LOOPBACK.has(s.host)) {
    throw listenWithoutKeys({ host: s.host }, 'host');
  }
  // The model's folder first (downloading it if needed): a model that can't be had stops the
  // server before it listens, opens the store or creates anything.
  const dir = await s.resolveModel();
  const logger = pino({ level: s.logLevel });
  const store = await s.openStore();
  // with API keys every request names its tenant; only open mode needs a default one
  const defaultTenant = s.adminKey ? null : await ensureDefaultTenant(store);
  let runtime: ModelRuntime | null = null;
  let notReady: string | null = 'loading the model';

  const offload = new OffloadPool();
  const { app, metrics } = await buildApp({
    store,
    adminKey: s.adminKey,
    metricsKey: s.metricsKey ?? null,
    defaultTenant,
    tenantLimits: s.tenantLimits,
    bodyLimit: s.bodyLimit,
    uploadLimit: s.uploadLimit,
    inputBudgets: s.inputBudgets,
    logger,
    runtime: () => runtime,
    notReadyReason: () => notReady,
    usageFlushMs: s.usageFlushMs,
  });
  const url = await app.listen({ host: s.host, port: s.port });
  app.log.info({ url, mode: s.adminKey ? 'multi-tenant' : 'single-tenant (open, loopback only)' }, 'listening');
  const worker = s.startWorker?.(logger.child({ component: 'supervisor' })) ?? null;

  const ready = (async () => {
    // the device probe (a second, in a child process) runs while the model loads
    const [model, placement] = await Promise.all([loadModel(dir), resolveDevice(s.device ?? 'auto', { cudaLibDirs: s.cudaLibDirs })]);
    if (placement.cudaSkipped) app.log.info(placement.cudaSkipped, 'not using CUDA');
    const engine = await EngineClient.start({
      modelDir: dir,
      cacheDir: s.cacheDir,
      limits: s.engineLimits,
      threads: s.threads,
      device: placement.device,
      kvBudget: s.kvBudget,
      deviceKvBudget: s.deviceKvBudget,
      prefixCacheBytes: s.prefixCacheBytes,
      weights: s.weights,
    });
    metrics.device.set({ device: placement.device, adapter: placement.adapter }, 1);
    for (const line of engine.startupLog) app.log.info(line);
    engine.onCrash((err) => {
      // Without its engine the server can only refuse: exit so a supervisor starts a fresh one.
      app.log.fatal({ err: err.message }, 'engine crashed; exiting');
      notReady = 'engine crashed';
      void shutdown('engine crashed').finally(() => process.exit(1));
    });
    const interventions = new InterventionCache(store, model.config, s.interventionCacheBytes, (hit) =>
      metrics.interventionCache.inc({ result: hit ? 'hit' : 'miss' }),
    );
    store.onInterventionChanged((id) => interventions.invalidate(id));
    if (s.sharedInterventionsDir) await registerSharedInterventions(store, s.sharedInterventionsDir, model.config, app.log);
    const grammars = new GrammarService(await loadGrammarVocab(dir, model.config.vocabSize, model.tokenizer.eosTokenIds), {
      budgets: s.grammarBudgets,
    });
    // json_object is one grammar for every request, and over a 128k vocabulary it compiles in
    // about 1.6 s (its strings' rules, string-lengths.ts): compiled now, not on its first request
    grammars.prepare({ kind: 'json_object', field: 'response_format' }).catch((err: Error) => {
      if (!grammars.isClosed)
        app.log.warn({ err: err.message }, 'json_object grammar: compiling it ahead failed; it compiles on first use');
    });
    runtime = {
      grammars,
      prefixCacheShared: s.prefixCacheShared ?? false,
      name: s.modelName,
      aliases: s.modelAliases ?? [],
      modelDir: dir,
      offload,
      config: model.config,
      tokenizer: model.tokenizer,
      engine,
      interventions,
      placement,
    };
    notReady = null;
    app.log.info(
      {
        model: s.modelName,
        dir,
        layers: model.config.numLayers,
        hidden: model.config.hiddenSize,
        device: placement.device,
        adapter: placement.adapter,
        weights: engine.weights.format,
        weightBytes: engine.weights.bytes,
        quantizationCache: engine.weights.cache,
        kvCache: engine.kvBudget.onDevice ? 'device' : 'host',
        kvBudgetBytes: engine.kvBudget.bytes,
        prefixCacheBytes: engine.prefixCacheBytes,
        prefixCacheShared: s.prefixCacheShared ?? false,
        ...describeHugePages(),
      },
      'model ready',
    );
  })();
  ready.catch((err) => {
    notReady = `model failed to load: ${err instanceof Error ? err.message : String(err)}`;
    app.log.error({ err }, 'model failed to load');
  });

  let stopping: Promise<void> | null = null;
  const shutdown = (reason: string) =>
    (stopping ??= (async () => {
      app.log.info({ reason, timeoutMs: s.shutdownTimeoutMs }, 'shutting down: no new requests, finishing in-flight generations');
      notReady = 'shutting down';
      const timer = setTimeout(() => {
        app.log.warn('shutdown timeout: cancelling the remaining generations');
        void runtime?.engine.terminate();
      }, s.shutdownTimeoutMs);
      timer.unref();
      const closed = app.close();
      // close() drops the connections idle now; a keep-alive client's turns idle only after its
      // in-flight answer, and would hold close() open until the client lets go
      const sweep = setInterval(() => app.server.closeIdleConnections(), 100);
      await Promise.all([closed, worker?.stop()]);
      clearInterval(sweep);
      clearTimeout(timer);
      await runtime?.engine.close();
      await runtime?.grammars.close();
      await offload.close();
      await store.close();
      app.log.info('stopped');
    })());
  return { app, url, ready, shutdown, worker };
}

/**
 * The tenant single-tenant mode acts as. Several servers may start at once on one database:
 * each creates one if none exists, and all then settle on the oldest.
 */
async function ensureDefaultTenant(store: Store): Promise<Tenant> {
  const oldest = async () => {
    let after: string | undefined;
    do {
      const page = await store.listTenants({ limit: 100, after });
      const found = page.data.find((t) => t.name === DEFAULT_TENANT_NAME);
      if (found) return found;
      after = page.nextCursor ?? undefined;
    } while (after);
    return null;
  };
  const existing = await oldest();
  if (existing) return existing;
  // Names are unique: a server that lost the race finds the winner's.
  await store
    .createTenant(DEFAULT_TENANT_NAME)
    .catch((e) => (e instanceof ReftError && e.category === 'conflict' ? null : Promise.reject(e)));
  return (await oldest())!;
}

/**
 * Registers each `<dir>/<name>/` artifact as a shared intervention every tenant can use.
 * Unchanged ones are left alone; changed ones are replaced; invalid ones are skipped with a
 * warning (a bad file on disk must not keep the server down).
 */
export async function registerSharedInterventions(
  store: Store,
  dir: string,
  base: { hiddenSize: number; numLayers: number },
  log: FastifyInstance['log'],
): Promise<void> {
  let entries: string[];
  try {
    entries = (await readdir(dir, { withFileTypes: true }))
      .filter((e) => e.isDirectory())
      .map((e) => e.name)
      .sort();
  } catch {
    return;
  }
  for (const name of entries) {
    try {
      const files = await readArtifactFiles(join(dir, name));
      const artifact = parseArtifact(files.config, files.weights, base);
      const sha = createHash('sha256').update(files.config).update(files.weights).digest('hex');
      const existing = await store.findIntervention(null, name);
      if (existing && existing.sha256 === sha) continue;
      await store.putIntervention(
        { tenantId: null, name, description: artifact.config.description ?? null, source: 'shared', config: artifact.config, files },
        existing?.id,
      );
      log.info({ name }, existing ? 'shared intervention updated' : 'shared intervention registered');
    } catch (err) {
      log.warn({ name, err: err instanceof Error ? err.message : String(err) }, 'skipping shared intervention');
    }
  }
}
