import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { modelFileNotJson, modelFileUnreadable } from '../errors.ts';
import { openCheckpoint, validateCheckpoint, type Checkpoint } from './checkpoint.ts';
import { parseModelConfig, type ModelConfig } from './config.ts';
import { loadTokenizer, type TextTokenizer } from './tokenizer.ts';

/** A checked Hugging Face model folder: config, weights index and tokenizer. */
export interface LoadedModel {
  dir: string;
  config: ModelConfig;
  checkpoint: Checkpoint;
  tokenizer: TextTokenizer;
}

async function readJson(dir: string, file: string, required: boolean): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(join(dir, file), 'utf8');
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw modelFileUnreadable({ dir, file }, file);
  }
  try {
    return JSON.parse(text);
  } catch {
    throw modelFileNotJson({ file }, file);
  }
}

export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  return parseModelConfig(await readJson(dir, 'config.json', true), await readJson(dir, 'generation_config.json', false));
}

export async function loadModel(dir: string): Promise<LoadedModel> {
  const config = await loadModelConfig(dir);
  const checkpoint = await openCheckpoint(dir);
  validateCheckpoint(config, checkpoint);
  const tokenizer = await loadTokenizer(dir, config);
  return { dir, config, checkpoint, tokenizer };
}

/** What tokenizing for a model needs: its tokenizer and its context length. */
export interface ModelTokenizer {
  tokenizer: TextTokenizer;
  maxPositions: number;
}

const tokenizers = new Map<string, Promise<ModelTokenizer>>();

/**
 * A model folder's tokenizer, loaded once per thread: the offload pool's threads tokenize many
 * inputs (prompts, training rows) for the one model a server runs.
 */
export function cachedTokenizer(dir: string): Promise<ModelTokenizer> {
  let m = tokenizers.get(dir);
  if (!m) {
    m = (async () => {
      const config = await loadModelConfig(dir);
      return { tokenizer: await loadTokenizer(dir, config), maxPositions: config.maxPositions };
    })();
    tokenizers.set(dir, m);
  }
  return m;
}
