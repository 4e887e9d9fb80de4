import { defineError } from './reft-error.ts';

/** The server: starting it, its engine and worker processes, capacity and readiness. */

// starting
export const adminKeyTooShort = defineError(
  'admin_key_too_short',
  'invalid_request',
  (p: { length: number; min: number }) => `REFT_ADMIN_KEY has ${p.length} characters; use at least ${p.min} (e.g. openssl rand -hex 32)`,
);
export const listenWithoutKeys = defineError(
  'listen_without_keys',
  'invalid_request',
  (p: { host: string }) => `refusing to listen on ${p.host} without API keys: set REFT_ADMIN_KEY to run multi-tenant, or bind to 127.0.0.1`,
);
export const cudaUnavailable = defineError(
  'cuda_unavailable',
  'unavailable',
  () =>
    'this onnxruntime-node install has no CUDA provider: after npm ci run ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js, or run with --device cpu',
);

// readiness and capacity (503s carry Retry-After)
export const modelLoading = defineError('model_loading', 'unavailable', () => 'the model is still loading');
export const queueFull = defineError(
  'queue_full',
  'overloaded',
  (p: { queued: number }) => `the server is at capacity (${p.queued} requests queued); retry shortly`,
);
export const engineStopping = defineError('engine_stopping', 'unavailable', (p: { what: string }) => `the engine ${p.what}`);

// failures inside the server: their words go to the log, never to clients
export const engineCrashed = defineError('engine_crashed', 'internal', (p: { reason: string }) => `engine worker ${p.reason}`);
export const importReplacedExisting = defineError('import_replaced_existing', 'internal', () => 'import replaced an existing intervention');
