import { homedir } from 'node:os';
import { join } from 'node:path';

/** Defaults that come from the environment, in one place. */
export const DEFAULT_MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct';

/** Where built graphs and other derived files go (never the model folder, which may be read-only). */
export function cacheDir(): string {
  return process.env.REFT_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'reft-server');
}

/** The Hugging Face Hub cache, shared with other HF tools as they define it. */
export function hubCacheDir(): string {
  if (process.env.HF_HUB_CACHE) return process.env.HF_HUB_CACHE;
  const hfHome = process.env.HF_HOME ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'huggingface');
  return join(hfHome, 'hub');
}
