import type { ZodError } from 'zod';
import { ReftError } from './errors/reft-error.ts';
import './errors/catalogue.ts'; // every declaration registered before the first error is built

/**
 * Typed errors shared by every layer: ReftError, and the catalogue's declarations (src/errors/,
 * one per specific error, grouped by area), each a function that builds its error.
 */
export {
  ReftError,
  CATEGORY_STATUS,
  declarationOf,
  type Category,
  type ErrorDeclaration,
  type ErrorOptions,
  type SerializedError,
} from './errors/reft-error.ts';
export { AREAS, catalogue, type ErrorCode } from './errors/catalogue.ts';
export * from './errors/request.ts';
export * from './errors/model.ts';
export * from './errors/interventions.ts';
export * from './errors/training.ts';
export * from './errors/tenants.ts';
export * from './errors/storage.ts';
export * from './errors/server.ts';

// The generic factories, kept for code written before the catalogue: each builds its category's
// generic entry (code = category). New code uses a specific entry instead.
export const invalidRequest = (message: string, field?: string) => new ReftError('invalid_request', message, field);
export const invalidIntervention = (message: string, field?: string) => new ReftError('invalid_intervention', message, field);
export const invalidCheckpoint = (message: string, field?: string) => new ReftError('invalid_checkpoint', message, field);
export const unsupportedModel = (message: string, field?: string) => new ReftError('unsupported_model', message, field);
export const notFound = (message: string, field?: string) => new ReftError('not_found', message, field);
/** The 404 of every lookup: the same words whether the thing is missing or another tenant's. */
export const noSuch = (kind: string, id: string, field = 'id') => new ReftError('not_found', `no ${kind} "${id}"`, field);

/**
 * The first problem zod found, with the field it is about as a dotted path under `prefix`
 * (an unknown key is named by itself: `reft_config.json.extra`).
 */
export function firstIssue(error: ZodError, prefix: string[] = []): { field: string; message: string } {
  const issue = error.issues[0];
  const keys = issue.code === 'unrecognized_keys' ? issue.keys : [];
  return { field: [...prefix, ...issue.path.map(String), ...keys.slice(0, 1)].join('.'), message: issue.message };
}
