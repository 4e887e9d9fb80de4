import { randomUUID } from 'node:crypto';
import type { Worker } from 'node:worker_threads';
import { ReftError, engineCrashed, engineStopping } from '../errors.ts';
import { spawnTypeScriptWorker } from '../offload/typescript-worker.ts';
import type { GenerationRequest, GenerationResult, TokenEvent } from './generation.ts';
import type { WeightsReport } from '../quant/load.ts';
import type { KvBudget } from './step-plan.ts';
import type { EngineStats, FromWorker, ToWorker, WorkerInit } from './worker-messages.ts';

/**
 * The main thread's handle on the engine worker: `generate` posts a request and resolves with
 * its result, streaming tokens through `onToken`; aborting the signal cancels it.
 */
interface Pending {
  resolve(r: GenerationResult): void;
  reject(e: ReftError): void;
  onToken?: (e: TokenEvent) => void;
}

function spawnWorker(workerData: WorkerInit): Worker {
  return spawnTypeScriptWorker(new URL('./worker.ts', import.meta.url), workerData);
}

export class EngineClient {
  private readonly pending = new Map<string, Pending>();
  private readonly statsWaiters = new Map<number, (s: EngineStats) => void>();
  private statsId = 0;
  private closed = false;
  private readonly crashListeners: Array<(e: ReftError) => void> = [];

  private constructor(
    private readonly worker: Worker,
    /** What the engine's weights are held as, and their bytes. */
    readonly weights: WeightsReport,
    /** The KV cache's budget, and whether it is on the device. */
    readonly kvBudget: KvBudget,
    /** Bytes the prefix cache may hold (0: off). */
    readonly prefixCacheBytes: number,
    /** What the engine said while loading (the quantization cache's outcome). */
    readonly startupLog: readonly string[],
  ) {
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    worker.on('error', (e) => this.crashed(engineCrashed({ reason: `crashed: ${e.message}` })));
    worker.on('exit', (code) => {
      if (!this.closed) this.crashed(engineCrashed({ reason: `exited with code ${code}` }));
    });
  }

  /** Called once if the engine thread dies while in use (its generations have failed). */
  onCrash(listener: (e: ReftError) => void): void {
    this.crashListeners.push(listener);
  }

  private crashed(e: ReftError): void {
    if (this.closed) return;
    this.closed = true;
    this.failAll(e);
    const { format, bytes } = this.weights;
    const idle = {
      queued: 0,
      running: 0,
      tokensInFlight: 0,
      steps: 0,
      lastBatchSize: 0,
      prefixCache: null,
      kvBytes: 0,
      weightsFormat: format,
      weightBytes: bytes,
    };
    for (const s of this.statsWaiters.values()) s(idle);
    this.statsWaiters.clear();
    for (const l of this.crashListeners) l(e);
  }

  static start(init: WorkerInit): Promise<EngineClient> {
    const worker = spawnWorker(init);
    return new Promise((resolve, reject) => {
      const onMessage = (m: FromWorker) => {
        if (m.type === 'ready') {
          worker.off('message', onMessage);
          resolve(new EngineClient(worker, m.weights, m.kvBudget, m.prefixCacheBytes, m.log));
        } else if (m.type === 'fatal') {
          void worker.terminate();
          reject(ReftError.fromJSON(m.error));
        }
      };
      worker.on('message', onMessage);
      worker.once('error', reject);
    });
  }

  private post(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  generate(request: GenerationRequest, opts: { onToken?: (e: TokenEvent) => void; signal?: AbortSignal } = {}): Promise<GenerationResult> {
    if (this.closed) return Promise.reject(engineStopping({ what: 'is shutting down' }, undefined, { retryAfterSeconds: 1 }));
    const key = randomUUID();
    return new Promise<GenerationResult>((resolve, reject) => {
      this.pending.set(key, { resolve, reject, onToken: opts.onToken });
      if (opts.signal) {
        if (opts.signal.aborted) return this.post({ type: 'cancel', key });
        opts.signal.addEventListener('abort', () => this.post({ type: 'cancel', key }), { once: true });
      }
      this.post({ type: 'generate', key, request });
    });
  }

  stats(): Promise<EngineStats> {
    const id = ++this.statsId;
    return new Promise((resolve) => {
      this.statsWaiters.set(id, resolve);
      this.post({ type: 'stats', id });
    });
  }

  private onMessage(m: FromWorker): void {
    switch (m.type) {
      case 'token':
        this.pending.get(m.key)?.onToken?.(m.event);
        break;
      case 'done':
        this.pending.get(m.key)?.resolve(m.result);
        this.pending.delete(m.key);
        break;
      case 'error':
        this.pending.get(m.key)?.reject(ReftError.fromJSON(m.error));
        this.pending.delete(m.key);
        break;
      case 'stats':
        this.statsWaiters.get(m.id)?.(m.stats);
        this.statsWaiters.delete(m.id);
        break;
      case 'fatal':
        this.failAll(ReftError.fromJSON(m.error));
        break;
    }
  }

  private failAll(e: ReftError): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /** Lets running generations finish, then stops the worker. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const exited = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    this.post({ type: 'shutdown' });
    await exited;
  }

  /** Stops the worker at once; running generations fail. */
  async terminate(): Promise<void> {
    this.closed = true;
    await this.worker.terminate();
    this.failAll(engineStopping({ what: 'was stopped' }));
  }
}
