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
// CUDA (ORT's CUDA provider, installed by `npm run setup:cuda`; src/runtime/cuda/)
export const cudaProviderMissing = defineError(
  'cuda_provider_missing',
  'unavailable',
  () => "ORT's CUDA provider is not installed: run npm run setup:cuda, or run with --device cpu",
);
export const cudaProviderMismatch = defineError(
  'cuda_provider_mismatch',
  'unavailable',
  (p: { dir: string; provider: string; ort: string }) =>
    `the CUDA provider in ${p.dir} is from ORT ${p.provider} but onnxruntime-node is ${p.ort}, and a provider only works with its own ORT version: run npm run setup:cuda again`,
);
export const cudaLibraryMissing = defineError(
  'cuda_library_missing',
  'unavailable',
  (p: { library: string; pip: string }) =>
    `CUDA library ${p.library} not found (ORT's CUDA provider needs CUDA 13's cuBLAS, cuRAND and runtime): install the CUDA 13 toolkit, or pip install ${p.pip}, and pass its lib folder (site-packages/nvidia/cu13/lib) with --cuda-lib-dir or LD_LIBRARY_PATH`,
);
export const cudaDriverMissing = defineError(
  'cuda_driver_missing',
  'unavailable',
  (p: { library: string }) =>
    `no NVIDIA driver: ${p.library} not found (it comes with the driver; a container needs the GPU passed through, e.g. docker run --gpus all), or run with --device cpu`,
);
export const cudaNoDevice = defineError(
  'cuda_no_device',
  'unavailable',
  (p: { detail: string }) => `CUDA found no usable GPU (${p.detail}); run with --device cpu`,
);
export const cudaProviderLoadFailed = defineError(
  'cuda_provider_load_failed',
  'unavailable',
  (p: { detail: string }) => `ORT's CUDA provider failed to load: ${p.detail}`,
);
export const cudaLibDirMissing = defineError(
  'cuda_lib_dir_missing',
  'invalid_request',
  (p: { dir: string }) => `--cuda-lib-dir ${p.dir} is not a folder`,
);

// npm run setup:cuda
export const cudaSetupPlatform = defineError(
  'cuda_setup_platform',
  'invalid_request',
  (p: { platform: string }) => `ORT's CUDA provider from npm is built for Linux x64; this machine is ${p.platform}`,
);
export const cudaSetupOrtMismatch = defineError(
  'cuda_setup_ort_mismatch',
  'invalid_request',
  (p: { what: string; has: string; ort: string }) =>
    `${p.what} is from ORT ${p.has} but onnxruntime-node's library is ORT ${p.ort}, and a provider only works with its own ORT version: keep onnxruntime-node at ${p.has} (package.json pins it)`,
);
export const cudaSetupNoSpace = defineError(
  'cuda_setup_no_space',
  'unavailable',
  (p: { dir: string; needMb: number; freeMb: number }) =>
    `not enough disk space in ${p.dir}: the CUDA provider needs ${p.needMb} MB there, ${p.freeMb} MB are free`,
);
export const cudaSetupFetchFailed = defineError(
  'cuda_setup_fetch_failed',
  'unavailable',
  (p: { spec: string; reason: string }) => `npm could not fetch ${p.spec}: ${p.reason}`,
);
export const cudaSetupPackageInvalid = defineError(
  'cuda_setup_package_invalid',
  'invalid_request',
  (p: { source: string; problem: string }) => `${p.source} is not the CUDA provider package: ${p.problem}`,
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
