import { readFileSync, realpathSync } from 'node:fs';
import { constants } from 'node:os';

/** glibc's RTLD_NODELETE (dlfcn.h), which Node's os.constants.dlopen leaves out. */
const RTLD_NODELETE = 0x1000;

/**
 * Loads shared libraries by path into this process, for good, so that a library loaded later
 * (ORT's CUDA provider) finds them: the dynamic loader matches a needed library by its soname
 * against those already loaded before it searches any folder. This is how `--cuda-lib-dir`
 * works; LD_LIBRARY_PATH can't be changed for a running process (the loader reads it once, at
 * start). Node's process.dlopen is the dlopen at hand: it dlopen()s the file, finds no Node
 * addon in it, throws "Module did not self-register" and dlclose()s it, which RTLD_NODELETE
 * turns into a no-op. So a library counts as loaded when it is mapped afterwards, whatever
 * was thrown. A library whose own needs are not met yet is retried after the others.
 * Returns the first library that could not be loaded, with the loader's reason.
 */
export function preloadLibraries(paths: readonly string[]): { path: string; error: string } | null {
  let pending = [...paths];
  while (pending.length) {
    const failed = pending.flatMap((path) => {
      const error = dlopenForGood(path);
      return error === null ? [] : [{ path, error }];
    });
    if (failed.length === 0) return null;
    if (failed.length === pending.length) return failed[0];
    pending = failed.map((f) => f.path);
  }
  return null;
}

function dlopenForGood(path: string): string | null {
  try {
    process.dlopen({ exports: {} }, path, constants.dlopen.RTLD_NOW | RTLD_NODELETE);
    return null;
  } catch (e) {
    return isMapped(path) ? null : (e as Error).message;
  }
}

function isMapped(path: string): boolean {
  const real = realpathSync(path);
  return readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .some((line) => line.endsWith(` ${real}`));
}
