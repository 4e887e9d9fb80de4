import { existsSync } from 'node:fs';
import { DEFAULT_GRAMMAR_BUDGETS } from '../grammar/spec.ts';
import { basename, isAbsolute, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { DEFAULT_LIMITS } from '../engine/scheduler.ts';
import { WorkerSupervisor } from '../jobs/supervisor.ts';
import { startServer } from '../server/serve.ts';
import { DEFAULT_TENANT_LIMITS } from '../server/tenant-limits.ts';
import { DEFAULT_KV_BUDGET } from '../engine/step-runner.ts';
import { resolveWeightFormat } from '../quant/formats.ts';
import { cacheDir } from '../settings.ts';
import { DEFAULT_MAX_TRAINING_CHARS, DEFAULT_MAX_TRAINING_ROWS } from '../jobs/data.ts';
import { openStore } from '../storage/open.ts';
import { modelDir, modelOption } from './model-option.ts';
import { parseLibDirs } from '../runtime/cuda/load.ts';
import { bytesArg, envOption as opt, intArg as int, storeOptions, workerArgv, workerOptions, type WorkerFlags } from './options.ts';

const PACKAGE_ROOT = join(import.meta.dirname, '..', '..');

interface ServeFlags extends WorkerFlags {
  model: string;
  host: string;
  port: number;
  dataDir: string;
  database?: string;
  worker: boolean;
  interventionsDir: string;
  maxBatchSize: number;
  maxTokensInFlight: number;
  maxQueue: number;
  tenantMaxConcurrent: number;
  tenantMaxQueued: number;
  tenantMaxInterventions: number;
  tenantMaxBytes: number;
  tenantMaxFileBytes: number;
  tenantMaxJobs: number;
  adapterCacheBytes: number;
  maxBodyBytes: number;
  maxUploadBytes: number;
  maxPromptChars?: number;
  grammarMaxBytes: number;
  grammarMaxDepth: number;
  grammarCompileTimeout: number;
  maxTrainingChars: number;
  maxTrainingRows: number;
  servedModelName?: string;
  shutdownTimeout: number;
  usageFlushMs: number;
  threads?: number;
  logLevel: string;
  kvBudget?: number;
  deviceKvBudget: number;
  prefixCacheBytes?: number;
  prefixCacheShared?: boolean;
}

export function serveCommand(): Command {
  const cmd = new Command('serve')
    .description('run the HTTP server (REFT_ADMIN_KEY turns on multi-tenant API keys) and a training worker next to it')
    .addOption(modelOption())
    .addOption(opt('--host <host>', 'address to listen on', 'REFT_HOST', undefined, '127.0.0.1'))
    .addOption(opt('--port <port>', 'port to listen on (0: any free port)', 'REFT_PORT', int('--port'), 8080));
  for (const o of [...storeOptions(), ...workerOptions()]) cmd.addOption(o);
  return cmd
    .addOption(new Option('--no-worker', 'do not start a training worker (run `reft-server worker` elsewhere)').env('REFT_NO_WORKER'))
    .addOption(
      opt(
        '--interventions-dir <dir>',
        'artifact folders registered at start as shared interventions',
        'REFT_INTERVENTIONS_DIR',
        undefined,
        join(PACKAGE_ROOT, 'interventions'),
      ),
    )
    .addOption(
      opt(
        '--max-batch-size <n>',
        'sequences decoded together at most',
        'REFT_MAX_BATCH_SIZE',
        int('--max-batch-size', 1),
        DEFAULT_LIMITS.maxBatchSize,
      ),
    )
    .addOption(
      opt(
        '--max-tokens-in-flight <n>',
        'bound on prompt + max_new_tokens over running sequences',
        'REFT_MAX_TOKENS_IN_FLIGHT',
        int('--max-tokens-in-flight', 1),
        DEFAULT_LIMITS.maxTokensInFlight,
      ),
    )
    .addOption(
      opt('--max-queue <n>', 'waiting requests before new ones get 503', 'REFT_MAX_QUEUE', int('--max-queue', 0), DEFAULT_LIMITS.maxQueue),
    )
    .addOption(
      opt(
        '--tenant-max-concurrent <n>',
        'concurrent generations per tenant',
        'REFT_TENANT_MAX_CONCURRENT',
        int('--tenant-max-concurrent', 1),
        DEFAULT_TENANT_LIMITS.maxConcurrentRequests,
      ),
    )
    .addOption(
      opt(
        '--tenant-max-queued <n>',
        'generations per tenant waiting for one of its concurrent slots; beyond this, 429',
        'REFT_TENANT_MAX_QUEUED',
        int('--tenant-max-queued', 0),
        DEFAULT_TENANT_LIMITS.maxQueuedRequests,
      ),
    )
    .addOption(
      opt(
        '--tenant-max-interventions <n>',
        'stored interventions per tenant',
        'REFT_TENANT_MAX_INTERVENTIONS',
        int('--tenant-max-interventions', 0),
        DEFAULT_TENANT_LIMITS.maxInterventions,
      ),
    )
    .addOption(
      opt(
        '--tenant-max-bytes <n>',
        'stored intervention bytes per tenant',
        'REFT_TENANT_MAX_BYTES',
        int('--tenant-max-bytes', 0),
        DEFAULT_TENANT_LIMITS.maxInterventionBytes,
      ),
    )
    .addOption(
      opt(
        '--tenant-max-file-bytes <n>',
        'stored training-file bytes per tenant',
        'REFT_TENANT_MAX_FILE_BYTES',
        int('--tenant-max-file-bytes', 0),
        DEFAULT_TENANT_LIMITS.maxFileBytes,
      ),
    )
    .addOption(
      opt(
        '--tenant-max-jobs <n>',
        'queued or running training jobs per tenant',
        'REFT_TENANT_MAX_JOBS',
        int('--tenant-max-jobs', 1),
        DEFAULT_TENANT_LIMITS.maxActiveJobs,
      ),
    )
    .addOption(
      opt(
        '--adapter-cache-bytes <n>',
        'memory for parsed interventions (LRU)',
        'REFT_ADAPTER_CACHE_BYTES',
        int('--adapter-cache-bytes', 1),
        512 * 1024 ** 2,
      ),
    )
    .addOption(
      opt('--max-body-bytes <n>', 'largest JSON request body', 'REFT_MAX_BODY_BYTES', int('--max-body-bytes', 1024), 8 * 1024 ** 2),
    )
    .addOption(
      opt('--max-upload-bytes <n>', 'largest uploaded file', 'REFT_MAX_UPLOAD_BYTES', int('--max-upload-bytes', 1024), 64 * 1024 ** 2),
    )
    .addOption(
      opt(
        '--max-prompt-chars <n>',
        "characters per prompt, checked before tokenizing (default: 16 × the model's context length)",
        'REFT_MAX_PROMPT_CHARS',
        int('--max-prompt-chars', 1),
      ),
    )
    .addOption(
      opt(
        '--grammar-max-bytes <n>',
        'structured output: bytes of a JSON schema (as compact JSON), an EBNF grammar, or a choice list',
        'REFT_GRAMMAR_MAX_BYTES',
        int('--grammar-max-bytes', 1),
        DEFAULT_GRAMMAR_BUDGETS.maxBytes,
      ),
    )
    .addOption(
      opt(
        '--grammar-max-depth <n>',
        'structured output: nesting depth of a JSON schema',
        'REFT_GRAMMAR_MAX_DEPTH',
        int('--grammar-max-depth', 1),
        DEFAULT_GRAMMAR_BUDGETS.maxDepth,
      ),
    )
    .addOption(
      opt(
        '--grammar-compile-timeout <ms>',
        'structured output: milliseconds a schema or grammar may take to compile (past it: a 400, and the compilation is stopped)',
        'REFT_GRAMMAR_COMPILE_TIMEOUT',
        int('--grammar-compile-timeout', 1),
        DEFAULT_GRAMMAR_BUDGETS.compileTimeoutMs,
      ),
    )
    .addOption(
      opt(
        '--max-training-chars <n>',
        'characters of training text per file or job, checked before tokenizing',
        'REFT_MAX_TRAINING_CHARS',
        int('--max-training-chars', 1),
        DEFAULT_MAX_TRAINING_CHARS,
      ),
    )
    .addOption(
      opt(
        '--max-training-rows <n>',
        'rows per training file or job',
        'REFT_MAX_TRAINING_ROWS',
        int('--max-training-rows', 1),
        DEFAULT_MAX_TRAINING_ROWS,
      ),
    )
    .addOption(
      opt(
        '--served-model-name <name>',
        "the base model's name in the API (default: the Hub id, or the model folder's name)",
        'REFT_SERVED_MODEL_NAME',
      ),
    )
    .addOption(
      opt(
        '--shutdown-timeout <ms>',
        'on SIGTERM, how long in-flight generations may take to finish',
        'REFT_SHUTDOWN_TIMEOUT_MS',
        int('--shutdown-timeout', 0),
        30_000,
      ),
    )
    .addOption(
      opt(
        '--usage-flush-ms <ms>',
        'how often per-tenant usage is written to the store',
        'REFT_USAGE_FLUSH_MS',
        int('--usage-flush-ms', 10),
        5000,
      ),
    )
    .addOption(opt('--threads <n>', 'ORT intra-op threads (default: every core)', 'REFT_THREADS', int('--threads', 1)))
    .addOption(
      opt(
        '--kv-budget <bytes>',
        "bytes the KV cache may hold in host memory at a step's peak (e.g. 4GiB; default: half the machine's memory beyond the weights); requests beyond it wait in the queue",
        'REFT_KV_BUDGET',
        bytesArg('--kv-budget'),
      ),
    )
    .addOption(
      opt(
        '--prefix-cache-bytes <bytes>',
        "bytes the prefix cache's blocks of prompt keys and values may hold (0: off; default a quarter of the KV budget, at most 1 GiB; on a GPU within --device-kv-budget)",
        'REFT_PREFIX_CACHE_BYTES',
        bytesArg('--prefix-cache-bytes', 0),
      ),
    )
    .addOption(
      opt(
        '--prefix-cache-shared',
        "share the prefix cache's blocks between tenants (single-tenant deployments; by default each tenant has its own)",
        'REFT_PREFIX_CACHE_SHARED',
      ),
    )
    .addOption(
      opt(
        '--device-kv-budget <bytes>',
        "bytes the KV cache may hold on a GPU (--device webgpu) at a step's peak; requests beyond it wait in the queue",
        'REFT_DEVICE_KV_BUDGET',
        bytesArg('--device-kv-budget'),
        DEFAULT_KV_BUDGET,
      ),
    )
    .addOption(opt('--log-level <level>', 'pino log level', 'REFT_LOG_LEVEL', undefined, 'info'))
    .action(runServe);
}

/** The name clients see for the base model: never a local path (it would leak the server's layout). */
export function servedModelName(model: string, given?: string): string {
  if (given) return given;
  const local = isAbsolute(model) || model.startsWith('.') || existsSync(model);
  return local ? basename(resolve(model)) : model;
}

async function runServe(f: ServeFlags): Promise<void> {
  const weights = resolveWeightFormat(f.weights); // the engine runs on the CPU
  const server = await startServer({
    resolveModel: () => modelDir(f.model),
    modelName: servedModelName(f.model, f.servedModelName),
    modelAliases: [f.model],
    host: f.host,
    port: f.port,
    openStore: () => openStore({ database: f.database, dataDir: f.dataDir }),
    startWorker: f.worker
      ? (log) => {
          // the same settings the server runs with, for the worker process
          const argv = [
            join(PACKAGE_ROOT, 'bin', 'reft-server.js'),
            'worker',
            '--model',
            f.model,
            '--data-dir',
            f.dataDir,
            '--log-level',
            f.logLevel,
            ...workerArgv(f),
          ];
          if (f.database) argv.push('--database', f.database);
          if (f.threads) argv.push('--threads', String(f.threads));
          const supervisor = new WorkerSupervisor(argv, log);
          supervisor.start();
          return supervisor;
        }
      : null,
    adminKey: process.env.REFT_ADMIN_KEY || null,
    metricsKey: process.env.REFT_METRICS_KEY || null,
    cacheDir: cacheDir(),
    sharedInterventionsDir: f.interventionsDir,
    tenantLimits: {
      maxConcurrentRequests: f.tenantMaxConcurrent,
      maxQueuedRequests: f.tenantMaxQueued,
      maxInterventions: f.tenantMaxInterventions,
      maxInterventionBytes: f.tenantMaxBytes,
      maxFileBytes: f.tenantMaxFileBytes,
      maxActiveJobs: f.tenantMaxJobs,
    },
    engineLimits: { ...DEFAULT_LIMITS, maxBatchSize: f.maxBatchSize, maxTokensInFlight: f.maxTokensInFlight, maxQueue: f.maxQueue },
    interventionCacheBytes: f.adapterCacheBytes,
    bodyLimit: f.maxBodyBytes,
    uploadLimit: f.maxUploadBytes,
    inputBudgets: {
      maxPromptChars: f.maxPromptChars ?? null,
      maxTrainingChars: f.maxTrainingChars,
      maxTrainingRows: f.maxTrainingRows,
      trainMemoryBudget: f.trainMemoryBudget,
    },
    grammarBudgets: { maxBytes: f.grammarMaxBytes, maxDepth: f.grammarMaxDepth, compileTimeoutMs: f.grammarCompileTimeout },
    shutdownTimeoutMs: f.shutdownTimeout,
    usageFlushMs: f.usageFlushMs,
    logLevel: f.logLevel,
    threads: f.threads,
    device: f.device,
    kvBudget: f.kvBudget,
    cudaLibDirs: parseLibDirs(f.cudaLibDir),
    deviceKvBudget: f.deviceKvBudget,
    prefixCacheBytes: f.prefixCacheBytes,
    prefixCacheShared: f.prefixCacheShared,
    weights,
  });
  const stop = (signal: string) => {
    server.shutdown(signal).then(
      () => process.exit(0),
      (err) => {
        server.app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  server.ready.catch(async (err) => {
    // A server that can't load its model can't serve: say why in one line and exit non-zero
    // so a supervisor notices, rather than staying up and answering 503 forever.
    process.stderr.write(`reft-server: ${err instanceof Error ? err.message : String(err)}\n`);
    await server.shutdown('model failed to load').catch(() => {});
    process.exit(1);
  });
}
