import type { FastifyInstance } from 'fastify';
import type { Store } from '../../../storage/store.ts';
import type { GenerationService } from '../../generation-service.ts';
import { chatCompletionsRoute } from './chat.ts';
import { completionsRoute } from './completions.ts';
import { modelsRoutes } from './models.ts';

/**
 * OpenAI-compatible completions, chat completions and model listing, so existing clients
 * (the official SDKs) work unchanged. `model` names an intervention (name or id) or the base
 * model. Fields OpenAI defines but this server can't honour are refused by name, not ignored.
 */
export function openaiRoutes(app: FastifyInstance, service: GenerationService, store: Store): void {
  completionsRoute(app, service);
  chatCompletionsRoute(app, service);
  modelsRoutes(app, service, store);
}
