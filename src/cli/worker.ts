import { Command } from 'commander';
import pino from 'pino';
import { parseLibDirs } from '../runtime/cuda/load.ts';
import { resolveDevice } from '../runtime/device.ts';
import { JobRunner } from '../jobs/runner.ts';
import { loadModel } from '../model/load.ts';
import { cacheDir } from '../settings.ts';
import { describeStore, openStore } from '../storage/open.ts';
import { describeHugePages } from '../runtime/huge-pages.ts';
import { modelDir, modelOption } from './model-option.ts';
import { envOption, intArg, storeOptions, workerOptions, type WorkerFlags } from './options.ts';
import { resolveWeightFormat } from '../quant/formats.ts';

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
  const cmd = new Command('worker')
    .description('run a training worker: claim queued jobs, train, register the results')
    .addOption(modelOption());
  for (const o of [...storeOptions(), ...workerOptions()]) cmd.addOption(o);
  return cmd
    .addOption(envOption('--threads <n>', 'ORT intra-op threads', 'REFT_THREADS', intArg('--threads', 1)))
    .addOption(envOption('--log-level <level>', 'pino log level', 'REFT_LOG_LEVEL', undefined, 'info'))
    .action(runWorker);
}

/** How long a stopping worker may take to hand its job back before it exits anyway. */
const STOP_GRACE_MS = 3000;

/**
 * A worker started by a server (it has an IPC channel to it) stops when that server dies, however
 * it died: the channel closes, and (as a fallback) the parent process no longer exists.
 */
function exitWithParent(stop: (why: string) => void): void {
  if (!process.send) return; // started by hand or by a process manager: it outlives nothing
  process.channel?.unref(); // the channel alone must not keep a finished worker alive
  // the server may have died while this process was still starting (before anyone listened)
  if (!process.connected) return stop('server gone before the worker started');
  process.removeAllListeners('disconnect'); // bin/reft-server.js's exit-while-loading
  process.once('disconnect', () => stop('server gone (IPC channel closed)'));
  // process.ppid is read once at start in Node: ask whether the parent still exists instead
  const parent = process.ppid;
  const check = setInterval(() => {
    try {
      process.kill(parent, 0);
    } catch {
      clearInterval(check);
      stop('server gone (parent process exited)');
    }
  }, 1000);
  check.unref();
}

async function runWorker(f: Flags): Promise<void> {
  const log = pino({ level: f.logLevel }).child({ component: 'worker' });
  const placement = await resolveDevice(f.device, { cudaLibDirs: parseLibDirs(f.cudaLibDir) });
  if (placement.cudaSkipped) log.info(placement.cudaSkipped, 'not using CUDA');
  const weights = resolveWeightFormat(f.weights, placement.device);
  // Signals and the server's death are watched from the start: loading the model takes a while.
  let runner: JobRunner | null = null;
  const stop = (why: string) => {
    log.info({ why }, 'worker stopping');
    if (!runner) process.exit(0); // nothing claimed yet: nothing to hand back
    runner.stop();
    // Stop after the current step and hand the job back; whatever is still running after the
    // grace period is abandoned (its lease expires and another worker resumes from the checkpoint).
    setTimeout(() => {
      log.warn({ why, graceMs: STOP_GRACE_MS }, 'worker did not stop in time; exiting');
      process.exit(1);
    }, STOP_GRACE_MS).unref();
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  exitWithParent(stop);
  const where = { database: f.database, dataDir: f.dataDir };
  const store = await openStore(where);
  const model = await loadModel(await modelDir(f.model));
  log.info(
    { model: f.model, store: describeStore(where), device: placement.device, adapter: placement.adapter, weights, ...describeHugePages() },
    'model loaded',
  );
  runner = new JobRunner({
    store,
    model,
    log,
    leaseMs: f.leaseMs,
    maxAttempts: f.maxAttempts,
    pollMs: f.pollMs,
    checkpointMs: f.checkpointMs,
    budget: { maxSteps: f.jobMaxSteps, maxSeconds: f.jobMaxSeconds },
    trainMemoryBudget: f.trainMemoryBudget,
    device: placement.device,
    threads: f.threads,
    cacheDir: cacheDir(),
    weights,
  });
  await runner.run();
  await store.close();
  log.info('worker stopped');
}
