import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { artifactFileUnreadable } from '../errors.ts';
import { parseArtifact, type Artifact, type BaseModelShape } from './artifact.ts';

export const CONFIG_FILE = 'reft_config.json';
export const WEIGHTS_FILE = 'reft_weights.safetensors';

/** The raw bytes of an artifact folder (reft_config.json + reft_weights.safetensors). */
export async function readArtifactFiles(dir: string): Promise<{ config: Uint8Array; weights: Uint8Array }> {
  const read = async (file: string) => {
    try {
      return new Uint8Array(await readFile(join(dir, file)));
    } catch {
      throw artifactFileUnreadable({ dir, file, expected: `${CONFIG_FILE} and ${WEIGHTS_FILE}` }, file);
    }
  };
  return { config: await read(CONFIG_FILE), weights: await read(WEIGHTS_FILE) };
}

export async function readArtifactDir(dir: string, base: BaseModelShape): Promise<Artifact> {
  const files = await readArtifactFiles(dir);
  return parseArtifact(files.config, files.weights, base);
}

/**
 * Writes reft_config.json and reft_weights.safetensors into `outDir`, each atomically: written to a
 * temporary file in the same folder, flushed, then renamed over the target, so a reader never
 * sees a half-written file. The weights go first, so a config never points at missing weights.
 */
export async function writeArtifact(outDir: string, result: { configBytes: Uint8Array; weightBytes: Uint8Array }): Promise<void> {
  await mkdir(outDir, { recursive: true });
  await writeAtomically(join(outDir, WEIGHTS_FILE), result.weightBytes);
  await writeAtomically(join(outDir, CONFIG_FILE), result.configBytes);
}

async function writeAtomically(path: string, bytes: Uint8Array): Promise<void> {
  const tmp = `${path}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    const fh = await open(tmp, 'wx');
    try {
      await fh.writeFile(bytes);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}
