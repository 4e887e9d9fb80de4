import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { chmod, mkdtemp, rename, rm, stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  ReftError,
  cudaSetupFetchFailed,
  cudaSetupNoSpace,
  cudaSetupOrtMismatch,
  cudaSetupPackageInvalid,
  cudaSetupPlatform,
} from '../../errors.ts';
import { readElfLibrary } from './elf.ts';
import { CUDA_PROVIDER, PROVIDER_LIBRARY, ortBindingDir, providerOrtVersion } from './provider.ts';

const run = promisify(execFile);
const MB = 1_000_000;
const mb = (bytes: number) => Math.ceil(bytes / MB);
const SPEC = `${CUDA_PROVIDER.name}@${CUDA_PROVIDER.version}`;
const CORE_LIBRARY = 'libonnxruntime.so.1';

export interface SetupOptions {
  /** Where ORT's core library is and the provider goes (default: onnxruntime-node's). */
  bindingDir?: string;
  /** The package's tarball, already here (e.g. carried to a machine without a registry). */
  tarball?: string;
  /** Progress, one line at a time. */
  log?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}

export interface SetupResult {
  /** False when the right provider was already there (nothing was fetched or written). */
  changed: boolean;
  bindingDir: string;
}

/**
 * `npm run setup:cuda`: puts ORT's CUDA provider (PROVIDER_LIBRARY and its shared bridge) beside
 * onnxruntime-node's core library, from the npm package that carries it (CUDA_PROVIDER). In
 * order: the platform; the core library's ORT version against the package's (a mismatch is
 * refused before anything is fetched); done already if both files are there with their
 * digests; disk space; the tarball (`npm pack`, so nothing comes from elsewhere than the npm
 * registry, and npm's cache serves a second run) or `tarball`, checked against the registry's
 * integrity; the two files extracted into a folder beside the core library, their digests and
 * the provider's own ORT version checked, then renamed into place (a failure leaves the folder
 * as it was).
 */
export async function setupCudaProvider(opts: SetupOptions = {}): Promise<SetupResult> {
  const log = opts.log ?? (() => {});
  if (process.platform !== 'linux' || process.arch !== 'x64') throw cudaSetupPlatform({ platform: `${process.platform}/${process.arch}` });
  const dir = opts.bindingDir ?? ortBindingDir();
  const core = join(dir, CORE_LIBRARY);
  if (!existsSync(core))
    throw cudaSetupPackageInvalid({ source: dir, problem: `it has no ${CORE_LIBRARY} (is onnxruntime-node installed? run npm ci)` });
  const ort = await providerOrtVersion(core, CUDA_PROVIDER.ortVersion);
  if (ort !== CUDA_PROVIDER.ortVersion) throw cudaSetupOrtMismatch({ what: SPEC, has: CUDA_PROVIDER.ortVersion, ort });
  log(`onnxruntime-node's core library (${dir}) is ORT ${ort}; ${SPEC} holds ORT ${CUDA_PROVIDER.ortVersion}'s CUDA provider`);

  if (await allInstalled(dir)) {
    log(`already installed: ${CUDA_PROVIDER.files.map((f) => f.name).join(', ')} match ${SPEC}'s`);
    return { changed: false, bindingDir: dir };
  }

  const fileBytes = CUDA_PROVIDER.files.reduce((n, f) => n + f.bytes, 0);
  await ensureSpace(dir, fileBytes + (opts.tarball ? 0 : CUDA_PROVIDER.tarballBytes) + 16 * MB);
  const staging = await mkdtemp(join(dir, '.cuda-setup-'));
  try {
    const tarball = opts.tarball ?? (await fetchTarball(staging, log, opts.env));
    await checkIntegrity(tarball, Boolean(opts.tarball), log);
    log(`extracting ${CUDA_PROVIDER.files.map((f) => f.name).join(' and ')} (${mb(fileBytes)} MB)`);
    await extract(tarball, staging);
    for (const f of CUDA_PROVIDER.files) {
      const path = join(staging, CUDA_PROVIDER.folder, f.name);
      if (!existsSync(path)) throw cudaSetupPackageInvalid({ source: tarball, problem: `it has no ${CUDA_PROVIDER.folder}/${f.name}` });
      if ((await sha256(path)) !== f.sha256) throw cudaSetupPackageInvalid({ source: tarball, problem: `its ${f.name} is not ${SPEC}'s` });
    }
    const provider = join(staging, CUDA_PROVIDER.folder, PROVIDER_LIBRARY);
    const built = await providerOrtVersion(provider, ort);
    if (built !== ort) throw cudaSetupOrtMismatch({ what: `the provider in ${tarball}`, has: built, ort });
    const { needed } = await readElfLibrary(provider);
    log(
      `the provider is ORT ${built}'s, built for CUDA ${CUDA_PROVIDER.cudaMajor}; it needs ${needed.filter((n) => /cu|cuda/.test(n)).join(', ')}`,
    );
    for (const f of CUDA_PROVIDER.files) {
      const from = join(staging, CUDA_PROVIDER.folder, f.name);
      await chmod(from, 0o755);
      await rename(from, join(dir, f.name));
    }
    log(`installed into ${dir}`);
    return { changed: true, bindingDir: dir };
  } catch (e) {
    if (!isNoSpace(e)) throw e;
    const s = await statfs(dir);
    throw cudaSetupNoSpace({ dir, needMb: mb(fileBytes), freeMb: Math.floor((s.bavail * s.bsize) / MB) });
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

/** Both files in `dir` with the package's sizes and digests. */
async function allInstalled(dir: string): Promise<boolean> {
  for (const f of CUDA_PROVIDER.files) {
    const path = join(dir, f.name);
    if (!existsSync(path) || (await stat(path)).size !== f.bytes || (await sha256(path)) !== f.sha256) return false;
  }
  return true;
}

/** Refuses, before writing anything, when `dir`'s filesystem has less than `bytes` free. */
export async function ensureSpace(dir: string, bytes: number): Promise<void> {
  const s = await statfs(dir);
  const free = s.bavail * s.bsize;
  if (free < bytes) throw cudaSetupNoSpace({ dir, needMb: mb(bytes), freeMb: Math.floor(free / MB) });
}

function isNoSpace(e: unknown): boolean {
  return (
    !(e instanceof ReftError) &&
    /ENOSPC|No space left on device/.test(`${(e as { code?: string }).code ?? ''} ${(e as Error)?.message ?? ''}`)
  );
}

/**
 * `npm pack <spec>` into `into`: npm fetches the tarball from the registry it is configured
 * for (or takes it from its cache, offline too) and checks the registry's integrity.
 */
async function fetchTarball(into: string, log: (line: string) => void, env = process.env): Promise<string> {
  log(`fetching ${SPEC} through npm (${mb(CUDA_PROVIDER.tarballBytes)} MB, from npm's cache if it has it)`);
  // under `npm run`, the npm that runs us; else the one on the PATH
  const npm = env.npm_execpath ? [process.execPath, [env.npm_execpath]] : ['npm', []];
  const [cmd, pre] = npm as [string, string[]];
  try {
    const { stdout } = await run(cmd, [...pre, 'pack', SPEC, '--pack-destination', into, '--json', '--ignore-scripts'], {
      env,
      maxBuffer: 16 * MB,
    });
    const [packed] = JSON.parse(stdout.slice(stdout.indexOf('['))) as Array<{ filename: string }>;
    return join(into, packed.filename);
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    const reason =
      (err.stderr ?? '')
        .split('\n')
        .map((l) => l.replace(/^npm (error|ERR!)\s*/, '').trim())
        .filter((l) => l && !/^(A complete log|Log files|code |errno |syscall )/.test(l))
        .at(0) ?? err.message;
    throw cudaSetupFetchFailed({ spec: SPEC, reason });
  }
}

/** The registry's integrity (sha512) of the tarball: npm checked it on fetching; a carried file is checked here. */
async function checkIntegrity(tarball: string, given: boolean, log: (line: string) => void): Promise<void> {
  if (!existsSync(tarball)) throw cudaSetupPackageInvalid({ source: tarball, problem: 'no such file' });
  const digest = `sha512-${await hash(tarball, 'sha512', 'base64')}`;
  if (digest !== CUDA_PROVIDER.integrity)
    throw cudaSetupPackageInvalid({ source: tarball, problem: `its integrity ${digest.slice(0, 22)}… is not the registry's for ${SPEC}` });
  log(`${given ? tarball : SPEC}: integrity matches the registry's (${CUDA_PROVIDER.integrity.slice(0, 22)}…)`);
}

/** The two libraries out of the tarball (GNU tar, which every Linux this runs on has). */
async function extract(tarball: string, into: string): Promise<void> {
  const members = CUDA_PROVIDER.files.map((f) => `${CUDA_PROVIDER.folder}/${f.name}`);
  try {
    await run('tar', ['-xzf', tarball, '-C', into, '--no-same-owner', ...members], { maxBuffer: 16 * MB });
  } catch (e) {
    const stderr = (e as { stderr?: string }).stderr ?? '';
    if (/No space left/.test(stderr)) throw Object.assign(new Error(stderr), { code: 'ENOSPC' });
    throw cudaSetupPackageInvalid({ source: tarball, problem: stderr.trim().split('\n')[0] || (e as Error).message });
  }
}

function hash(path: string, algorithm: string, encoding: 'hex' | 'base64'): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash(algorithm);
    createReadStream(path)
      .on('data', (d) => h.update(d))
      .on('error', reject)
      .on('end', () => resolve(h.digest(encoding)));
  });
}

const sha256 = (path: string) => hash(path, 'sha256', 'hex');
