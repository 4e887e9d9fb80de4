import type { EngineClient } from '../engine/engine-client.ts';
import { ReftError } from '../errors.ts';
import type { InterventionCache } from '../interventions/cache.ts';
import type { ModelConfig } from '../model/config.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';

/**
 * What the routes need once the model is loaded: the base model's name, config and tokenizer,
 * the engine, and the intervention cache. Until then the server answers health checks and
 * refuses generation with 503.
 */
export interface ModelRuntime {
  /** The name the API serves the base model under. */
  name: string;
  /** Where it came from (the model spec: a folder or a Hub repo id). */
  source: string;
  config: ModelConfig;
  tokenizer: TextTokenizer;
  engine: EngineClient;
  interventions: InterventionCache;
}

export function notReady(): ReftError {
  return new ReftError('unavailable', 'the model is still loading', undefined, 2);
}
