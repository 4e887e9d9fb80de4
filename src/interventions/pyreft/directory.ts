import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pyreftFileMissing, pyreftFileTooLarge } from '../../errors.ts';
import { importPyreft, type PyreftBaseModel, type PyreftImportInput, type PyreftImportResult } from './convert.ts';
import { savedFileNames } from './saved-config.ts';

/** Upper bound on one file read from a pyreft folder (interventions are kilobytes to megabytes). */
const MAX_FILE_BYTES = 256 * 1024 * 1024;

export type PyreftDirectoryOptions = Pick<PyreftImportInput, 'positions' | 'shareWeights' | 'name'>;

/**
 * Imports a folder written by pyreft's `ReftModel.save`: its config.json and the intkey_*.bin
 * files config.json's sorted_keys name (other files in the folder are not read).
 */
export async function importPyreftDirectory(dir: string, opts: PyreftDirectoryOptions, base: PyreftBaseModel): Promise<PyreftImportResult> {
  const config = await readLimited(dir, 'config.json', `${dir} has no config.json (a trainer checkpoint's intervenable_model/ has only the intkey_*.bin files; use the folder written by ReftModel.save)`);
  const files = new Map<string, Uint8Array>();
  for (const name of savedFileNames(config)) files.set(name, await readLimited(dir, name, `${name} named by config.json's sorted_keys is missing`));
  return importPyreft({ ...opts, config, files }, base);
}

/** Reads `dir/name`, refusing a file that is missing (with `missing` as the message) or too large. */
async function readLimited(dir: string, name: string, missing: string): Promise<Uint8Array> {
  const path = join(dir, name);
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch (e) {
    if ((e as NodeJS.ErrnoException | null)?.code === 'ENOENT') throw pyreftFileMissing({ what: missing }, name);
    throw e;
  }
  if (size > MAX_FILE_BYTES) throw pyreftFileTooLarge({ file: name, bytes: size, limit: MAX_FILE_BYTES }, name);
  return new Uint8Array(await readFile(path));
}
