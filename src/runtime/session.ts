import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { probeModel } from './probe-model.ts';

export type Device = 'cpu' | 'cuda' | 'webgpu';

export interface SessionOptions {
  device?: Device;
  /** Intra-op threads; defaults to every core (one under WebGPU, where the CPU only does shapes). */
  threads?: number;
  /** Outputs to leave on the device ('gpu-buffer'), e.g. a KV cache fed back next step. */
  outputLocations?: Record<string, 'cpu' | 'gpu-buffer'>;
}

/**
 * The providers of a session on `device`. ORT adds the CPU provider behind them, for shape-only
 * nodes (and anything the device has no kernel for). The node binding 1.30 takes only a few
 * WebGPU options (preferredLayout, validationMode, the buffer cache modes, enableRobustness,
 * forceCpuNodeNames); the defaults serve.
 */
function executionProviders(device: Device): ort.InferenceSession.ExecutionProviderConfig[] {
  if (device === 'cuda') return ['cuda', 'cpu'];
  if (device === 'webgpu') return [{ name: 'webgpu' }];
  return ['cpu'];
}

/**
 * Creates an ORT session from graph bytes whose weights are external data in `dataDir`
 * (ORT resolves the initializers' `location` relative to it and memory-maps them).
 */
export async function createSession(graph: Uint8Array, dataDir: string, opts: SessionOptions = {}): Promise<ort.InferenceSession> {
  const device = opts.device ?? 'cpu';
  const threads = opts.threads ?? (device === 'webgpu' ? 1 : availableParallelism());
  return ort.InferenceSession.create(graph, {
    executionProviders: executionProviders(device),
    ...(opts.outputLocations ? { preferredOutputLocation: opts.outputLocations } : {}),
    graphOptimizationLevel: 'all',
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    extra: {
      session: {
        model_external_initializers_file_folder_path: dataDir,
        // spinning workers answer the next op at once; worth ~20% at batch 1 (measured). Under
        // WebGPU they would only spin while the GPU works (on llvmpipe, taking its cores).
        intra_op: { allow_spinning: device === 'webgpu' ? '0' : '1' },
      },
    },
  } as ort.InferenceSession.SessionOptions);
}

/** Whether ORT's CUDA provider loads here (the CPU-only install lists it but cannot load it). */
export async function cudaAvailable(): Promise<boolean> {
  // Without the provider libraries beside the binding, asking ORT for CUDA only makes it print a
  // native error line of its own before ours.
  const library = (name: string) => (process.platform === 'win32' ? `${name}.dll` : `lib${name}.so`);
  const providers = ['onnxruntime_providers_shared', 'onnxruntime_providers_cuda'].map(library);
  if (!providers.every((f) => existsSync(join(bindingDir(), f)))) return false;
  try {
    const session = await ort.InferenceSession.create(probeModel('Identity'), { executionProviders: ['cuda'], logSeverityLevel: 4 });
    await session.release();
    return true;
  } catch {
    return false;
  }
}

/** Where onnxruntime-node keeps its native libraries (and the CUDA install adds its providers). */
function bindingDir(): string {
  const entry = createRequire(import.meta.url).resolve('onnxruntime-node'); // <package>/dist/index.js
  return join(dirname(dirname(entry)), 'bin', 'napi-v6', process.platform, process.arch);
}
