import type { Placement } from '../runtime/device.ts';
import type { EngineClient } from '../engine/engine-client.ts';
import { ReftError, modelLoading } from '../errors.ts';
import type { InterventionCache } from '../interventions/cache.ts';
import type { ModelConfig } from '../model/config.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import type { OffloadPool } from '../offload/pool.ts';
import type { GrammarService } from '../grammar/service.ts';

/**
 * What the routes need once the model is loaded: the base model's name, config and tokenizer,
 * the engine, and the intervention cache. Until then the server answers health checks and
 * refuses generation with 503.
 */
export interface ModelRuntime {
  /** The base model's name in the API (--served-model-name): never a local path. */
  name: string;
  /** Other names that select the base model when a client gives them (the --model spec); never listed. */
  aliases: string[];
  /** The model's local folder (the offload pool's threads load the tokenizer from it). */
  modelDir: string;
  /** Worker threads for tokenization and parsing, off the event loop. */
  offload: OffloadPool;
  config: ModelConfig;
  tokenizer: TextTokenizer;
  engine: EngineClient;
  interventions: InterventionCache;
  /** Structured output: grammars compiled for this model's tokenizer, and the rows' matchers. */
  grammars: GrammarService;
  /** Whether every tenant's prompts share the prefix cache's blocks (single-tenant deployments); else each tenant has its own. */
  prefixCacheShared: boolean;
  /** The device the engine runs on, and its adapter. */
  placement: Placement;
}

export function notReady(): ReftError {
  return modelLoading(undefined, { retryAfterSeconds: 2 });
}
