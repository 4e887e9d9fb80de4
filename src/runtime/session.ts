import { availableParallelism } from 'node:os';
import * as ort from 'onnxruntime-node';

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
 * nodes (and anything the device has no kernel for). The node binding (1.29) takes only a few
 * WebGPU options (preferredLayout, validationMode, the buffer cache modes, forceCpuNodeNames;
 * 1.30 adds enableRobustness) and, for CUDA, only deviceId; the defaults serve.
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
