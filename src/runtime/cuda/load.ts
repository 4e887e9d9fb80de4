import { execFile } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import {
  ReftError,
  cudaDriverMissing,
  cudaLibDirMissing,
  cudaLibraryMissing,
  cudaNoDevice,
  cudaProviderLoadFailed,
  cudaProviderMismatch,
  cudaProviderMissing,
} from '../../errors.ts';
import { readElfLibrary } from './elf.ts';
import { preloadLibraries } from './preload.ts';
import {
  CUDA_LIBRARY_PACKAGES,
  DRIVER_LIBRARY,
  PROVIDER_LIBRARY,
  installedProviderFiles,
  ortBindingDir,
  ortNodeVersion,
  providerOrtVersion,
} from './provider.ts';

/** Whether ORT's CUDA provider works here, and if not, the error that says why. */
export type CudaStatus = { ok: true; gpu: string; preload: string[] } | { ok: false; error: ReftError };

export interface CudaOptions {
  /** Folders holding CUDA's libraries (--cuda-lib-dir), searched before the system's. */
  libDirs?: readonly string[];
  env?: NodeJS.ProcessEnv;
}

/** `--cuda-lib-dir a:b` as folders (empty entries dropped). */
export function parseLibDirs(value: string | undefined): string[] {
  return (value ?? '').split(delimiter).filter(Boolean);
}

/**
 * Checks ORT's CUDA provider in a child process, as `--device cuda` would use it: installed,
 * from onnxruntime-node's ORT version, its CUDA libraries found (in `libDirs`, then where the
 * dynamic loader looks), a driver and a GPU there (a one-node session runs on it). A child,
 * because ORT reports a provider that fails to load only as "Failed to load shared library"
 * and prints the loader's reason (the missing library's name) natively on stderr; a child's
 * stderr can be read, and a failed attempt leaves nothing behind in this process. Takes about
 * half a second where the provider can't load, a few seconds where it initializes a GPU.
 */
export async function cudaStatus(opts: CudaOptions = {}): Promise<CudaStatus> {
  const dir = ortBindingDir();
  if (!installedProviderFiles(dir).present) return { ok: false, error: cudaProviderMissing() };
  const ort = ortNodeVersion();
  const provider = await providerOrtVersion(join(dir, PROVIDER_LIBRARY), ort);
  if (provider !== ort) return { ok: false, error: cudaProviderMismatch({ dir, provider, ort }) };
  const preload = await cudaLibrariesIn(opts.libDirs ?? []);
  const child = fileURLToPath(new URL('./probe-child.ts', import.meta.url));
  const { stdout, stderr } = await promisify(execFile)(
    process.execPath,
    ['--import', pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href, child, JSON.stringify(preload)],
    { env: opts.env ?? process.env, timeout: 180_000, maxBuffer: 16 * 1024 * 1024 },
  ).catch((e: { stdout?: string; stderr?: string; message: string }) => ({
    stdout: e.stdout ?? '',
    stderr: `${e.stderr ?? ''}\n${e.message}`,
  }));
  const result = stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { ok: boolean; message?: string })
    .at(-1);
  if (result?.ok) return { ok: true, gpu: gpuName(), preload };
  return { ok: false, error: cudaFailure(`${result?.message ?? ''}\n${stderr}`) };
}

/**
 * The CUDA libraries ORT's provider needs that sit in `libDirs` (the first folder that has one
 * wins), in the order the provider names them: what `--cuda-lib-dir` loads before the provider.
 */
export async function cudaLibrariesIn(libDirs: readonly string[]): Promise<string[]> {
  for (const d of libDirs) if (!existsSync(d) || !statSync(d).isDirectory()) throw cudaLibDirMissing({ dir: d }, 'cuda-lib-dir');
  if (!libDirs.length) return [];
  const { needed } = await readElfLibrary(join(ortBindingDir(), PROVIDER_LIBRARY));
  const cuda = needed.filter((n) => n === DRIVER_LIBRARY || n in CUDA_LIBRARY_PACKAGES);
  return cuda.flatMap((name) => {
    const d = libDirs.find((x) => existsSync(join(x, name)));
    return d ? [join(d, name)] : [];
  });
}

/**
 * Loads the libraries `cudaStatus` found in --cuda-lib-dir into this process, before its first
 * CUDA session (see preloadLibraries). Throws what the loader said if one won't load.
 */
export function loadCudaLibraries(paths: readonly string[]): void {
  const failed = preloadLibraries(paths);
  if (failed) throw cudaFailure(failed.error);
}

// ORT colours its log lines
const ANSI = new RegExp(String.raw`\u001b\[[0-9;]*m`, 'g');

/**
 * The one-line error for what the probe reported (ORT's message and its native log, which
 * carries the dynamic loader's reason when the provider didn't load).
 */
export function cudaFailure(report: string): ReftError {
  const text = report.replace(ANSI, '');
  const missing = /([\w.+-]+\.so(?:\.\d+)*): cannot open shared object file/.exec(text)?.[1];
  if (missing === DRIVER_LIBRARY) return cudaDriverMissing({ library: missing });
  if (missing === PROVIDER_LIBRARY || missing === 'libonnxruntime_providers_shared.so') return cudaProviderMissing();
  if (missing) return cudaLibraryMissing({ library: missing, pip: CUDA_LIBRARY_PACKAGES[missing] ?? 'the package that has it' });
  const symbol = /undefined symbol: ([^\s,]+)(?:, version (\S+))?/.exec(text);
  if (symbol)
    return cudaProviderLoadFailed({
      detail: `undefined symbol ${symbol[1]}${symbol[2] ? ` (${symbol[2]})` : ''}: a CUDA library found is not the CUDA 13 build the provider needs`,
    });
  // the CUDA provider's CUDA_CALL errors: "CUDA failure 100: no CUDA-capable device is detected ; GPU=…"
  const failure = /CUDA failure (\d+): ([^;\n]+)/.exec(text);
  if (failure) return cudaNoDevice({ detail: `CUDA error ${failure[1]}: ${failure[2].trim()}` });
  const loaderReason = /Failed to load library \S+ with error: (.+)/.exec(text)?.[1];
  const firstLine = text
    .split('\n')
    .map((l) => l.trim())
    .find(Boolean);
  return cudaProviderLoadFailed({ detail: (loaderReason ?? firstLine ?? 'no reason given').trim() });
}

/** The GPU's model name as the NVIDIA driver gives it (/proc), or 'cuda' where it doesn't. */
function gpuName(): string {
  try {
    const root = '/proc/driver/nvidia/gpus';
    for (const id of readdirSync(root)) {
      const model = /^Model:\s*(.+)$/m.exec(readFileSync(join(root, id, 'information'), 'utf8'))?.[1];
      if (model) return `${model.trim()} (cuda)`;
    }
  } catch {
    // no /proc entry (a container without it): the provider's name will do
  }
  return 'cuda';
}
