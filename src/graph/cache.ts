import { createHash } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Built graphs on disk, keyed by what they are built from (checkpoint content, config and
 * builder version), so a restart skips the build. The cache lives outside the model folder,
 * which may be read-only.
 */
export async function cachedGraph(
  cacheDir: string,
  key: unknown,
  build: () => Uint8Array,
): Promise<{ bytes: Uint8Array; path: string; hit: boolean }> {
  const digest = createHash('sha256').update(JSON.stringify(key)).digest('hex').slice(0, 32);
  const path = join(cacheDir, 'graphs', `${digest}.onnx`);
  try {
    return { bytes: new Uint8Array(await readFile(path)), path, hit: true };
  } catch {
    const bytes = build();
    await mkdir(join(cacheDir, 'graphs'), { recursive: true });
    const tmp = `${path}.${process.pid}.${Date.now()}.tmp`;
    await writeFile(tmp, bytes);
    await rename(tmp, path); // atomic: a concurrent reader sees the old state or the whole file
    return { bytes, path, hit: false };
  }
}
