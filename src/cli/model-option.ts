import { Option } from 'commander';
import { resolveModelDir } from '../model/hub.ts';
import { DEFAULT_MODEL, hubCacheDir } from '../settings.ts';

export const modelOption = () =>
  new Option('--model <dir|org/name[@rev]>', 'a local Hugging Face model folder or a Hub repo id').env('REFT_MODEL').default(DEFAULT_MODEL);

/** A local folder as is; a Hub id downloaded once into the Hub cache. */
export function modelDir(spec: string): Promise<string> {
  return resolveModelDir(spec, { cacheDir: hubCacheDir() });
}
