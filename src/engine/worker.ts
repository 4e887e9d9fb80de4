import { parentPort, workerData } from 'node:worker_threads';
import { ReftError } from '../errors.ts';
import { loadModel } from '../model/load.ts';
import type { FromWorker, ToWorker, WorkerInit } from './worker-messages.ts';
import { Scheduler } from './scheduler.ts';
import { StepRunner } from './step-runner.ts';

/**
 * The engine's thread: ORT's session.run blocks the thread it runs on, so the model, the
 * runner and the scheduler live here and the main thread only exchanges messages.
 */
const port = parentPort!;
const send = (m: FromWorker) => port.postMessage(m);
const serialize = (e: unknown) => ReftError.from(e).toJSON();

async function main(init: WorkerInit): Promise<void> {
  const model = await loadModel(init.modelDir);
  const log: string[] = [];
  const runner = await StepRunner.create(model.config, model.checkpoint, {
    cacheDir: init.cacheDir,
    threads: init.threads,
    device: init.device,
    kvBudget: init.kvBudget,
    deviceKvBudget: init.deviceKvBudget,
    prefixCacheBytes: init.prefixCacheBytes,
    weights: init.weights,
    log: (message) => log.push(message),
  });
  const scheduler = new Scheduler(runner, model.tokenizer, new Set(model.tokenizer.eosTokenIds), init.limits);
  port.on('message', (msg: ToWorker) => {
    switch (msg.type) {
      case 'generate':
        try {
          scheduler.submit(msg.key, msg.request, {
            onToken: (event) => send({ type: 'token', key: msg.key, event }),
            onDone: (result) => send({ type: 'done', key: msg.key, result }),
            onError: (error) => send({ type: 'error', key: msg.key, error: error.toJSON() }),
          });
        } catch (e) {
          send({ type: 'error', key: msg.key, error: serialize(e) });
        }
        break;
      case 'cancel':
        scheduler.cancel(msg.key);
        break;
      case 'stats':
        send({
          type: 'stats',
          id: msg.id,
          stats: { ...scheduler.stats(), kvBytes: runner.kvBytes, weightsFormat: runner.weights.format, weightBytes: runner.weights.bytes },
        });
        break;
      case 'shutdown':
        void scheduler
          .idle()
          .then(() => runner.close())
          .then(() => process.exit(0));
        break;
    }
  });
  send({ type: 'ready', weights: runner.weights, kvBudget: runner.kvBudget, prefixCacheBytes: runner.prefixCache?.budgetBytes ?? 0, log });
}

main(workerData as WorkerInit).catch((e) => send({ type: 'fatal', error: serialize(e) }));
