import type { ZodError } from 'zod';
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

/**
 * The first problem zod found, with the field it is about as a dotted path under `prefix`
 * (an unknown key is named by itself: `reft_config.json.extra`).
 */
export function firstIssue(error: ZodError, prefix: string[] = []): { field: string; message: string } {
  const issue = error.issues[0];
  const keys = issue.code === 'unrecognized_keys' ? issue.keys : [];
  return { field: [...prefix, ...issue.path.map(String), ...keys.slice(0, 1)].join('.'), message: issue.message };
}
