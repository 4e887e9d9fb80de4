import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { cudaStatus, loadCudaLibraries } from './cuda/load.ts';
import { webgpuUnavailable, type ErrorCode } from '../errors.ts';
import { probeModel } from './probe-model.ts';
import type { Device } from './session.ts';

/** What `--device` accepts: a device, or `auto` to take the best one this machine has. */
export type DeviceChoice = Device | 'auto';
export const DEVICE_CHOICES: readonly DeviceChoice[] = ['auto', 'cpu', 'webgpu', 'cuda'];

/** The GPU Dawn (ORT's WebGPU provider) runs on, as the Vulkan loader names it. */
export interface Adapter {
  name: string;
  /** The Vulkan driver library (libvulkan_lvp.so is Mesa's llvmpipe). */
  driver: string;
  /** A CPU rasterizer posing as a GPU: correct, but slower than the CPU provider. */
  software: boolean;
}

/** Where the model runs, as logs, /readyz and /metrics say it. */
export interface Placement {
  device: Device;
  /** `name (driver)` of the WebGPU adapter, the GPU's name on CUDA, the provider's name otherwise. */
  adapter: string;
  /** Under `auto`, why CUDA was passed over (its error's code and one-line message). */
  cudaSkipped?: { code: ErrorCode; reason: string };
}

export interface DeviceOptions {
  /** The input a device that isn't there is blamed on. */
  field?: string;
  /** Folders with CUDA's libraries (--cuda-lib-dir), loaded before ORT's CUDA provider. */
  cudaLibDirs?: readonly string[];
}

// Mesa's llvmpipe (lavapipe), Google's SwiftShader: Vulkan drivers that rasterize on the CPU
const SOFTWARE_DRIVER = /lvp|lavapipe|swiftshader/i;
const SOFTWARE_NAME = /llvmpipe|lavapipe|softpipe|swiftshader/i;

/**
 * Resolves `--device`: `auto` takes CUDA if its provider loads and runs, else WebGPU on a
 * hardware adapter, else the CPU; a software adapter (llvmpipe) only when WebGPU is asked for
 * by name. A device asked for by name that isn't there is an error naming `field`, for CUDA the
 * reason (see cudaStatus); `auto` says in `cudaSkipped` why it passed CUDA over. Once CUDA is
 * chosen, the libraries found in `cudaLibDirs` are loaded into this process.
 */
export async function resolveDevice(choice: DeviceChoice, opts: DeviceOptions = {}): Promise<Placement> {
  const field = opts.field ?? 'device';
  if (choice === 'cpu') return { device: 'cpu', adapter: 'cpu' };
  let cudaSkipped: Placement['cudaSkipped'];
  if (choice === 'cuda' || choice === 'auto') {
    const cuda = await cudaStatus({ libDirs: opts.cudaLibDirs });
    if (cuda.ok) {
      loadCudaLibraries(cuda.preload);
      return { device: 'cuda', adapter: cuda.gpu };
    }
    if (choice === 'cuda') throw cuda.error.withField(cuda.error.message, field);
    cudaSkipped = { code: cuda.error.code, reason: cuda.error.message };
  }
  const adapter = await webgpuAdapter();
  if (choice === 'auto') {
    const placement: Placement =
      adapter && !adapter.software ? { device: 'webgpu', adapter: describeAdapter(adapter) } : { device: 'cpu', adapter: 'cpu' };
    return { ...placement, cudaSkipped };
  }
  if (!adapter) {
    throw webgpuUnavailable(field);
  }
  return { device: 'webgpu', adapter: describeAdapter(adapter) };
}

export function describeAdapter(a: Adapter): string {
  return `${a.name} (${a.driver}${a.software ? ', software' : ''})`;
}

/**
 * The adapter ORT's WebGPU provider gets here, or null when it finds none. Neither ORT nor
 * Dawn tells which adapter they took, but the Vulkan loader does (VK_LOADER_DEBUG=driver logs
 * `Using "<device>" with driver: "<library>"` when Dawn creates its device) on the native
 * stderr, so a child process creates a one-node WebGPU session and this reads its stderr.
 * Dawn prefers discrete, then integrated GPUs, then CPU adapters, as the engine's own session
 * will. Takes about a second.
 */
export async function webgpuAdapter(env: NodeJS.ProcessEnv = process.env): Promise<Adapter | null> {
  const script = `
    const ort = require(process.argv[1]);
    ort.InferenceSession.create(Buffer.from(process.argv[2], 'base64'), { executionProviders: [{ name: 'webgpu' }] })
      .then((s) => s.release())
      .then(() => process.stdout.write('probe: session created'), (e) => { process.stdout.write('probe failed: ' + e.message); process.exitCode = 3; });
  `;
  const ortEntry = createRequire(import.meta.url).resolve('onnxruntime-node');
  const graph = Buffer.from(probeModel('Relu')).toString('base64');
  const { stdout, stderr } = await promisify(execFile)(process.execPath, ['-e', script, ortEntry, graph], {
    env: { ...env, VK_LOADER_DEBUG: 'driver' },
    timeout: 120_000,
    maxBuffer: 16 * 1024 * 1024,
  }).catch((e: { stdout?: string; stderr?: string }) => ({ stdout: e.stdout ?? '', stderr: e.stderr ?? '' }));
  if (!stdout.includes('probe: session created')) return null;
  return parseAdapter(stderr);
}

/** The device line of the Vulkan loader's driver log (the last one: the device Dawn created). */
export function parseAdapter(log: string): Adapter {
  const used = [...log.matchAll(/Using "(.+)" with driver: "(.+)"/g)].at(-1);
  // WebGPU without the Vulkan loader's log (Metal, Direct3D): no software rasterizer is offered
  // there unless asked for, so the adapter counts as hardware
  if (!used) return { name: 'unknown', driver: 'unknown', software: false };
  const [, name, driver] = used;
  return { name, driver, software: SOFTWARE_DRIVER.test(driver) || SOFTWARE_NAME.test(name) };
}
