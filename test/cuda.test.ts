import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cudaFailure } from '../src/runtime/cuda/load.ts';
import { readElfLibrary } from '../src/runtime/cuda/elf.ts';
import { CUDA_PROVIDER, PROVIDER_LIBRARY, SHARED_LIBRARY, ortBindingDir, providerOrtVersion } from '../src/runtime/cuda/provider.ts';
import { ensureSpace, setupCudaProvider } from '../src/runtime/cuda/setup.ts';
import { ReftError } from '../src/errors.ts';
import { STORIES } from './support/fixtures.ts';
import { runCli, startServerProcess } from './support/server.ts';

/**
 * ORT's CUDA provider on a machine with no GPU and no CUDA libraries (this one, and CI's):
 * `setup-cuda` installs the real provider package, and `--device cuda` then stops with one
 * line naming the missing CUDA library, `auto` runs on the CPU and says why.
 *
 * No network here: `setup-cuda` fetches through `npm pack` with npm offline, from npm's cache,
 * which .ci/run fills (`npm cache add com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9`, a
 * 179 MB download on a machine whose npm cache lacks it). Libraries that stand in for CUDA's
 * (right sonames, no code) are built with gcc.
 */

const SPEC = `${CUDA_PROVIDER.name}@${CUDA_PROVIDER.version}`;
const OFFLINE = { ...process.env, npm_config_offline: 'true' };
const NOT_CACHED = `npm's cache has no ${SPEC}: run npm cache add ${SPEC} (.ci/run does)`;
const BINDING = ortBindingDir();
const PROMPT = ['--model', STORIES, '--prompt', 'Once upon a time', '--max-new-tokens', '3'];
const MISSING_CUBLAS =
  "CUDA library libcublasLt.so.13 not found (ORT's CUDA provider needs CUDA 13's cuBLAS, cuRAND and runtime): install the CUDA 13 toolkit, or pip install nvidia-cublas, and pass its lib folder (site-packages/nvidia/cu13/lib) with --cuda-lib-dir or LD_LIBRARY_PATH";

/** A shared library with this soname and C source, built by gcc into `dir`. */
function sharedLibrary(dir: string, soname: string, source = 'int reft_stub;'): string {
  const path = join(dir, soname);
  execFileSync('gcc', ['-shared', '-fPIC', '-x', 'c', '-', '-o', path, `-Wl,-soname,${soname}`], { input: source });
  return path;
}

/** A library that embeds an ORT version string as ORT's own do (NUL-terminated, in .rodata). */
const withVersion = (v: string) => `const char ort_version[] = "x\\0" "${v}";`;

const tmp = () => mkdtempSync(join(tmpdir(), 'reft-cuda-'));

describe('setup-cuda: the provider package from npm', () => {
  it('installs the real package beside a core library of its ORT version, checked, and a second run changes nothing', async () => {
    // a folder holding onnxruntime-node's own core library, so node_modules stays as it is
    const dir = tmp();
    symlinkSync(join(BINDING, 'libonnxruntime.so.1'), join(dir, 'libonnxruntime.so.1'));
    const lines: string[] = [];
    const first = await setupCudaProvider({ bindingDir: dir, env: OFFLINE, log: (l) => lines.push(l) }).catch((e: Error) => {
      throw new Error(/ENOTCACHED|cache mode/.test(e.message) ? `${NOT_CACHED}\n${e.message}` : e.message);
    });
    expect(first).toEqual({ changed: true, bindingDir: dir });
    expect(lines).toEqual([
      `onnxruntime-node's core library (${dir}) is ORT 1.29.0; ${SPEC} holds ORT 1.29.0's CUDA provider`,
      `fetching ${SPEC} through npm (180 MB, from npm's cache if it has it)`,
      `${SPEC}: integrity matches the registry's (sha512-FopIhNE/Ng+v2X6…)`,
      'extracting libonnxruntime_providers_shared.so and libonnxruntime_providers_cuda.so (230 MB)',
      "the provider is ORT 1.29.0's, built for CUDA 13; it needs libcublasLt.so.13, libcublas.so.13, libcurand.so.10, libcudart.so.13, libcuda.so.1",
      `installed into ${dir}`,
    ]);
    // what the issue says the provider needs, read off the installed file itself
    const provider = join(dir, PROVIDER_LIBRARY);
    expect((await readElfLibrary(provider)).needed.slice(0, 5)).toEqual([
      'libcublasLt.so.13',
      'libcublas.so.13',
      'libcurand.so.10',
      'libcudart.so.13',
      'libcuda.so.1',
    ]);
    expect(await providerOrtVersion(provider, '1.29.0')).toBe('1.29.0');
    expect(await providerOrtVersion(provider, '1.30.0')).toBe('1.29.0'); // what it is, asked for another
    expect(existsSync(join(dir, SHARED_LIBRARY))).toBe(true);
    // its staging folder and the tarball are gone
    expect(readdirSync(dir).sort()).toEqual(['libonnxruntime.so.1', PROVIDER_LIBRARY, SHARED_LIBRARY].sort());

    lines.length = 0;
    expect(await setupCudaProvider({ bindingDir: dir, env: OFFLINE, log: (l) => lines.push(l) })).toEqual({
      changed: false,
      bindingDir: dir,
    });
    expect(lines[1]).toBe(`already installed: libonnxruntime_providers_shared.so, libonnxruntime_providers_cuda.so match ${SPEC}'s`);
    expect(lines.some((l) => l.startsWith('fetching'))).toBe(false);
    rmSync(dir, { recursive: true });
  }, 120_000);

  it('refuses, before fetching anything, a core library of another ORT version', async () => {
    const dir = tmp();
    sharedLibrary(dir, 'libonnxruntime.so.1', withVersion('1.30.0'));
    const lines: string[] = [];
    const err = await setupCudaProvider({ bindingDir: dir, env: OFFLINE, log: (l) => lines.push(l) }).catch((e: ReftError) => e);
    expect(err).toMatchObject({ code: 'cuda_setup_ort_mismatch' });
    expect((err as ReftError).message).toBe(
      `${SPEC} is from ORT 1.29.0 but onnxruntime-node's library is ORT 1.30.0, and a provider only works with its own ORT version: keep onnxruntime-node at 1.29.0 (package.json pins it)`,
    );
    expect(lines).toEqual([]);
    expect(existsSync(join(dir, PROVIDER_LIBRARY))).toBe(false);
    rmSync(dir, { recursive: true });
  });

  it("refuses a carried tarball that is not the registry's, and writes nothing", async () => {
    const dir = tmp();
    symlinkSync(join(BINDING, 'libonnxruntime.so.1'), join(dir, 'libonnxruntime.so.1'));
    // the package's layout, with a provider of the right ORT version string but not the real one
    const pkg = join(tmp(), 'package', 'Plugins', 'Linux', 'x64');
    mkdirSync(pkg, { recursive: true });
    sharedLibrary(pkg, PROVIDER_LIBRARY, withVersion('1.29.0'));
    sharedLibrary(pkg, SHARED_LIBRARY);
    const tarball = join(dir, '..', `fake-${Date.now()}.tgz`);
    execFileSync('tar', ['-czf', tarball, '-C', join(pkg, '..', '..', '..', '..'), 'package']);
    const err = await setupCudaProvider({ bindingDir: dir, tarball }).catch((e: ReftError) => e);
    expect(err).toMatchObject({ code: 'cuda_setup_package_invalid' });
    expect((err as ReftError).message).toMatch(
      /^\S+\.tgz is not the CUDA provider package: its integrity sha512-\S+… is not the registry's for \S+@0\.4\.9$/,
    );
    expect(readdirSync(dir)).toEqual(['libonnxruntime.so.1']);
    rmSync(dir, { recursive: true });
    rmSync(tarball);
  });

  it('refuses before writing when the disk has too little space', async () => {
    const dir = tmp();
    const s = await statfs(dir);
    const free = s.bavail * s.bsize;
    const err = await ensureSpace(dir, free + 1e9).catch((e: ReftError) => e);
    expect(err).toMatchObject({ code: 'cuda_setup_no_space' });
    expect((err as ReftError).message).toMatch(
      new RegExp(`^not enough disk space in ${dir}: the CUDA provider needs \\d+ MB there, \\d+ MB are free$`),
    );
    await ensureSpace(dir, 1e6); // a megabyte is there
    rmSync(dir, { recursive: true });
  });
});

describe('--device cuda with the provider installed and no CUDA libraries', () => {
  // node_modules' own binding folder: what ORT loads the provider from
  let installedHere = false;
  let setup: { status: number | null; stdout: string; stderr: string };
  beforeAll(async () => {
    const before = existsSync(join(BINDING, PROVIDER_LIBRARY));
    setup = await runCli(['setup-cuda'], OFFLINE);
    installedHere = !before && existsSync(join(BINDING, PROVIDER_LIBRARY));
  }, 120_000);
  afterAll(() => {
    // leave node_modules as this file found it
    if (installedHere) for (const f of [PROVIDER_LIBRARY, SHARED_LIBRARY]) rmSync(join(BINDING, f), { force: true });
  });

  it('npm run setup:cuda installs it, then says in one line why CUDA cannot run here', () => {
    if (setup.status !== 0) throw new Error(`${NOT_CACHED}\n${setup.stderr}`);
    const lines = setup.stdout.trim().split('\n');
    expect(lines.some((l) => l === `setup-cuda: installed into ${BINDING}` || l.startsWith('setup-cuda: already installed'))).toBe(true);
    expect(lines.at(-1)).toBe(`setup-cuda: installed, but --device cuda can't run here yet: ${MISSING_CUBLAS}`);
  });

  it('generate --device cuda stops with one line naming the missing CUDA library', async () => {
    const r = await runCli(['generate', '--device', 'cuda', ...PROMPT]);
    expect(r).toEqual({ status: 1, stdout: '', stderr: `reft-server: ${MISSING_CUBLAS}\n` });
  });

  it('generate with auto runs on the CPU and says why it did not use CUDA', async () => {
    const r = await runCli(['generate', ...PROMPT]);
    expect(r).toEqual({ status: 0, stdout: ', there was\n', stderr: `reft-server: not using CUDA, running on cpu: ${MISSING_CUBLAS}\n` });
  });

  it('a server left to choose logs why it did not use CUDA, and serves on the CPU', async () => {
    const server = await startServerProcess({ args: ['--no-worker'] });
    try {
      expect(server.logs.find((l) => l.msg === 'not using CUDA')).toMatchObject({ code: 'cuda_library_missing', reason: MISSING_CUBLAS });
      expect(server.logs.find((l) => l.msg === 'model ready')).toMatchObject({ device: 'cpu', adapter: 'cpu' });
    } finally {
      await server.stop();
    }
  }, 120_000);

  it('--cuda-lib-dir loads the libraries it finds first: with CUDA 13 sonames there, the missing one is the driver', async () => {
    const libs = tmp();
    for (const soname of ['libcublasLt.so.13', 'libcublas.so.13', 'libcurand.so.10', 'libcudart.so.13']) sharedLibrary(libs, soname);
    const noDriver = await runCli(['generate', '--device', 'cuda', '--cuda-lib-dir', libs, ...PROMPT]);
    expect(noDriver).toEqual({
      status: 1,
      stdout: '',
      stderr:
        'reft-server: no NVIDIA driver: libcuda.so.1 not found (it comes with the driver; a container needs the GPU passed through, e.g. docker run --gpus all), or run with --device cpu\n',
    });
    // the same through the environment, and LD_LIBRARY_PATH (read by the loader at start) alike
    expect(await runCli(['generate', '--device', 'cuda', ...PROMPT], { ...process.env, REFT_CUDA_LIB_DIR: libs })).toEqual(noDriver);
    expect(await runCli(['generate', '--device', 'cuda', ...PROMPT], { ...process.env, LD_LIBRARY_PATH: libs })).toEqual(noDriver);
    // libraries with the right names but not CUDA's: the provider's symbols are not in them
    sharedLibrary(libs, 'libcuda.so.1');
    const wrong = await runCli(['generate', '--device', 'cuda', '--cuda-lib-dir', libs, ...PROMPT]);
    expect(wrong.status).toBe(1);
    expect(wrong.stderr).toMatch(
      /^reft-server: ORT's CUDA provider failed to load: undefined symbol \w+ \(libcu\w+\.so\.\d+\): a CUDA library found is not the CUDA 13 build the provider needs\n$/,
    );
    const none = await runCli(['generate', '--device', 'cuda', '--cuda-lib-dir', join(libs, 'nope'), ...PROMPT]);
    expect(none.stderr).toBe(`reft-server: --cuda-lib-dir ${join(libs, 'nope')} is not a folder\n`);
    rmSync(libs, { recursive: true });
  }, 120_000);

  it('a provider of another ORT version beside onnxruntime-node is refused before it is loaded', async () => {
    const real = join(BINDING, PROVIDER_LIBRARY);
    const aside = `${real}.aside`;
    renameSync(real, aside);
    try {
      const dir = tmp();
      writeFileSync(real, readFileSync(sharedLibrary(dir, PROVIDER_LIBRARY, withVersion('1.30.0'))));
      const r = await runCli(['generate', '--device', 'cuda', ...PROMPT]);
      expect(r).toEqual({
        status: 1,
        stdout: '',
        stderr: `reft-server: the CUDA provider in ${BINDING} is from ORT 1.30.0 but onnxruntime-node is 1.29.0, and a provider only works with its own ORT version: run npm run setup:cuda again\n`,
      });
      rmSync(dir, { recursive: true });
    } finally {
      renameSync(aside, real);
    }
  });

  it('names a GPU or driver that CUDA refuses, in the words of the provider it has', () => {
    // the provider's own format for a failed CUDA call (CUDA_CALL_THROW), read off the library
    const format = '%s failure %d: %s ; GPU=%d ; hostname=%s ; file=%s ; line=%d ; expr=%s; %s';
    expect(readFileSync(join(BINDING, PROVIDER_LIBRARY)).includes(format)).toBe(true);
    const message = (code: number, text: string) =>
      `CUDA failure ${code}: ${text} ; GPU=0 ; hostname=h ; file=cuda_execution_provider.cc ; line=1 ; expr=cudaSetDevice(info_.device_id); `;
    expect(cudaFailure(message(100, 'no CUDA-capable device is detected')).message).toBe(
      'CUDA found no usable GPU (CUDA error 100: no CUDA-capable device is detected); run with --device cpu',
    );
    expect(cudaFailure(message(35, 'CUDA driver version is insufficient for CUDA runtime version'))).toMatchObject({
      code: 'cuda_no_device',
      message:
        'CUDA found no usable GPU (CUDA error 35: CUDA driver version is insufficient for CUDA runtime version); run with --device cpu',
    });
  });
});
