import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { invalidIntervention } from '../errors.ts';
import { parseArtifact, type Artifact, type BaseModelShape } from './artifact.ts';

export const CONFIG_FILE = 'reft_config.json';
export const WEIGHTS_FILE = 'reft_weights.safetensors';

/** The raw bytes of an artifact folder (reft_config.json + reft_weights.safetensors). */
export async function readArtifactFiles(dir: string): Promise<{ config: Uint8Array; weights: Uint8Array }> {
  const read = async (file: string) => {
    try {
      return new Uint8Array(await readFile(join(dir, file)));
    } catch {
      throw invalidIntervention(`${dir} has no readable ${file}; an intervention folder holds ${CONFIG_FILE} and ${WEIGHTS_FILE}`, file);
    }
  };
  return { config: await read(CONFIG_FILE), weights: await read(WEIGHTS_FILE) };
}

export async function readArtifactDir(dir: string, base: BaseModelShape): Promise<Artifact> {
  const files = await readArtifactFiles(dir);
  return parseArtifact(files.config, files.weights, base);
}
