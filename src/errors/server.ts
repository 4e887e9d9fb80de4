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

// devices
export const webgpuUnavailable = defineError(
  'webgpu_unavailable',
  'unavailable',
  () =>
    'WebGPU found no adapter: install the Vulkan loader (libvulkan1) and a Vulkan driver for the GPU (Mesa 25 for llvmpipe), or run with --device cpu',
);
export const deviceOutOfMemory = defineError(
  'device_out_of_memory',
  'overloaded',
  (p: { detail: string }) => `the device ran out of memory for this step (${p.detail}); lower --device-kv-budget or the batch size`,
);
export const deviceKvBudgetExceeded = defineError(
  'device_kv_budget_exceeded',
  'invalid_request',
  (p: { budget: number }) => `prompt plus max_new_tokens (${p.budget}) alone would exceed the device's KV cache budget`,
);
export const kvBudgetExceeded = defineError(
  'kv_budget_exceeded',
  'invalid_request',
  (p: { budget: number; bytes: number; limit: number }) =>
    `prompt plus max_new_tokens (${p.budget} tokens, ${mib(p.bytes)} MiB of KV cache at a step's peak) alone would exceed the KV cache budget (--kv-budget, ${mib(p.limit)} MiB)`,
);
export const weightsFormatUnknown = defineError(
  'weights_format_unknown',
  'invalid_request',
  (p: { value: string; formats: readonly string[] }) => `unknown weights format ${p.value}; one of ${p.formats.join(', ')}`,
);
export const weightsFormatUnsupported = defineError(
  'weights_format_unsupported',
  'invalid_request',
  (p: { format: string; device: string }) =>
    `--weights ${p.format} is not supported on the ${p.device} device: the graphs compute in float32 (on the CPU, ORT would convert half weights back to float32 at load); use f32, q8 or q4`,
);
export const grammarThreadFailed = defineError(
  'grammar_thread_failed',
  'internal',
  () => "structured output: the grammar thread of this request's row stopped answering",
);

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}
