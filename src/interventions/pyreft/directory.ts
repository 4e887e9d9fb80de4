import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { invalidIntervention } from '../../errors.ts';
import { importPyreft, type PyreftBaseModel, type PyreftImportResult } from './convert.ts';
import { savedFileNames } from './saved-config.ts';

/** Upper bound on one file read from a pyreft folder (interventions are kilobytes to megabytes). */
const MAX_FILE_BYTES = 256 * 1024 * 1024;

export interface PyreftDirectoryOptions {
  positions: string;
  shareWeights: boolean;
  name?: string;
}

/**
 * Imports a folder written by pyreft's `ReftModel.save`: its config.json and the intkey_*.bin
 * files config.json's sorted_keys name (other files in the folder are not read).
 */
export async function importPyreftDirectory(dir: string, opts: PyreftDirectoryOptions, base: PyreftBaseModel): Promise<PyreftImportResult> {
  const config = await readConfig(dir);
  const files = new Map<string, Uint8Array>();
  for (const name of savedFileNames(config)) files.set(name, await readLimited(join(dir, name), name));
  return importPyreft({ config, files, positions: opts.positions, shareWeights: opts.shareWeights, name: opts.name }, base);
}

async function readConfig(dir: string): Promise<Uint8Array> {
  try {
    return await readLimited(join(dir, 'config.json'), 'config.json');
  } catch (e) {
    if (isMissing(e)) {
      throw invalidIntervention(`${dir} has no config.json (a trainer checkpoint's intervenable_model/ has only the intkey_*.bin files; use the folder written by ReftModel.save)`, 'config.json');
    }
    throw e;
  }
}

async function readLimited(path: string, name: string): Promise<Uint8Array> {
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch (e) {
    if (isMissing(e) && name !== 'config.json') throw invalidIntervention(`${name} named by config.json's sorted_keys is missing`, name);
    throw e;
  }
  if (size > MAX_FILE_BYTES) throw invalidIntervention(`${name} is ${size} bytes (at most ${MAX_FILE_BYTES})`, name);
  return new Uint8Array(await readFile(path));
}

function isMissing(e: unknown): boolean {
  return (e as NodeJS.ErrnoException | null)?.code === 'ENOENT';
}
