import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { embeddedVersions } from './elf.ts';

/**
 * ORT's CUDA provider as npm carries it. onnxruntime-node ships the CPU (and WebGPU) library
 * only; its install script would fetch the CUDA provider from elsewhere. The Unity packaging of
 * ORT's release binaries (MIT, github.com/asus4/onnxruntime-unity) is on the npm registry,
 * and its Linux GPU package holds the provider libraries of one ORT version, built for CUDA 13.
 * A provider only works with the core library of the same ORT version: the core hands it a
 * table of its own functions (ProviderHost) and nothing checks the two versions match, so a
 * mismatch is not a clean error. Hence onnxruntime-node is pinned to this ORT version.
 */
export const CUDA_PROVIDER = {
  /** The ORT release the provider libraries come from. */
  ortVersion: '1.29.0',
  name: 'com.github.asus4.onnxruntime.linux-x64-gpu',
  version: '0.4.9',
  /** The registry's integrity of that tarball (npm verifies it as it fetches; we check it again). */
  integrity: 'sha512-FopIhNE/Ng+v2X65wVc9clPCBCvhvA53Hxo2U0Kf5fGdVsC7iCA+mZ0KLWggcQAj7TIZ6pNidR4AC10g74Xo6w==',
  tarballBytes: 179_145_956,
  /** Where the libraries sit in the tarball, their sizes (for the space check) and digests. */
  folder: 'package/Plugins/Linux/x64',
  files: [
    {
      name: 'libonnxruntime_providers_shared.so',
      bytes: 14_632,
      sha256: 'c6a12593396095f5670160e284c35d1700b7708cf3037b7042e2a5200ccae772',
    },
    {
      name: 'libonnxruntime_providers_cuda.so',
      bytes: 229_780_440,
      sha256: '56cf3254b118ad837ccc4ed8f6d1b23504bbf7ef91b34cbc0b289cb7f10b3037',
    },
  ],
  /** The CUDA major version its libraries are built for (the sonames' .13). */
  cudaMajor: 13,
} as const;

export const PROVIDER_LIBRARY = 'libonnxruntime_providers_cuda.so';
export const SHARED_LIBRARY = 'libonnxruntime_providers_shared.so';
export const SETUP_COMMAND = 'npm run setup:cuda';

/**
 * Where onnxruntime-node keeps its native libraries: ORT loads a provider from the folder of
 * its own core library (libonnxruntime.so.1), so that is where the provider goes.
 */
export function ortBindingDir(): string {
  const entry = createRequire(import.meta.url).resolve('onnxruntime-node'); // <package>/dist/index.js
  return join(dirname(dirname(entry)), 'bin', 'napi-v6', process.platform, process.arch);
}

/** The installed onnxruntime-node's version (its core library's ORT version). */
export function ortNodeVersion(): string {
  const entry = createRequire(import.meta.url).resolve('onnxruntime-node');
  return (JSON.parse(readFileSync(join(dirname(dirname(entry)), 'package.json'), 'utf8')) as { version: string }).version;
}

/**
 * The ORT version a provider library was built from: the version string it embeds, checked
 * against `expected` (it holds exactly one string of the form 1.N.N when built from ORT; other
 * version-like strings, e.g. a bundled library's, are told apart by equality with `expected`).
 * Returns `expected` when the library embeds it, else what it embeds instead (or 'unknown').
 */
export async function providerOrtVersion(path: string, expected: string): Promise<string> {
  const versions = await embeddedVersions(path);
  if (versions.includes(expected)) return expected;
  const ortLike = versions.filter((v) => /^1\.\d{2,}\.\d+$/.test(v));
  return ortLike.length ? ortLike.join(' or ') : 'unknown';
}

/** Which provider files are in `dir` (the shared bridge and the CUDA provider both are needed). */
export function installedProviderFiles(dir = ortBindingDir()): { present: boolean; missing: string[] } {
  const missing = [SHARED_LIBRARY, PROVIDER_LIBRARY].filter((f) => !existsSync(join(dir, f)));
  return { present: missing.length === 0, missing };
}

/**
 * Where each CUDA library the provider needs usually comes from: the CUDA 13 toolkit, or these
 * pip packages, whose CUDA 13 builds put their libraries in site-packages/nvidia/cu13/lib.
 */
export const CUDA_LIBRARY_PACKAGES: Readonly<Record<string, string>> = {
  'libcublasLt.so.13': 'nvidia-cublas',
  'libcublas.so.13': 'nvidia-cublas',
  'libcurand.so.10': 'nvidia-curand',
  'libcudart.so.13': 'nvidia-cuda-runtime',
};

/** The NVIDIA driver's user-space library: comes with the driver, never with a toolkit. */
export const DRIVER_LIBRARY = 'libcuda.so.1';
