import { Command } from 'commander';
import pino from 'pino';
import { ReftError } from '../errors.ts';
import { cudaAvailable } from '../engine/session.ts';
import { JobRunner } from '../jobs/runner.ts';
import { loadModel } from '../model/load.ts';
import { cacheDir } from '../settings.ts';
import { describeStore, openStore } from '../storage/open.ts';
import { describeHugePages } from '../engine/huge-pages.ts';
import { modelDir, modelOption } from './model-option.ts';
import { envOption, intArg, storeOptions, workerOptions, type WorkerFlags } from './options.ts';

/**
 * `reft-server worker`: the training worker (the GPU worker of a deployment). It claims queued
 * jobs from the store the servers use, trains them on its device, and registers the results.
 */
interface Flags extends WorkerFlags {
  model: string;
  dataDir: string;
  database?: string;
  threads?: number;
  logLevel: string;
}

export function workerCommand(): Command {
  const cmd = new Command('worker').description('run a training worker: claim queued jobs, train, register the results').addOption(modelOption());
  for (const o of [...storeOptions(), ...workerOptions()]) cmd.addOption(o);
  return cmd
    .addOption(envOption('--threads <n>', 'ORT intra-op threads', 'REFT_THREADS', intArg('--threads', 1)))
    .addOption(envOption('--log-level <level>', 'pino log level', 'REFT_LOG_LEVEL', undefined, 'info'))
    .action(runWorker);
}

async function runWorker(f: Flags): Promise<void> {
  const log = pino({ level: f.logLevel }).child({ component: 'worker' });
  if (f.device === 'cuda' && !(await cudaAvailable())) {
    throw new ReftError('unavailable', 'this onnxruntime-node install has no CUDA provider: after npm ci run ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js, or run with --device cpu', 'device');
  }
  const where = { database: f.database, dataDir: f.dataDir };
  const store = await openStore(where);
  const model = await loadModel(await modelDir(f.model));
  log.info({ model: f.model, store: describeStore(where), device: f.device, ...describeHugePages() }, 'model loaded');
  const runner = new JobRunner({
    store,
    model,
    log,
    leaseMs: f.leaseMs,
    maxAttempts: f.maxAttempts,
    pollMs: f.pollMs,
    checkpointMs: f.checkpointMs,
    budget: { maxSteps: f.jobMaxSteps, maxSeconds: f.jobMaxSeconds },
    device: f.device,
    threads: f.threads,
    cacheDir: cacheDir(),
  });
  const stop = () => runner.stop();
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  await runner.run();
  await store.close();
  log.info('worker stopped');
}
