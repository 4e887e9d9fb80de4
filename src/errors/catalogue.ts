import * as request from './request.ts';
import * as model from './model.ts';
import * as interventions from './interventions.ts';
import * as training from './training.ts';
import * as tenants from './tenants.ts';
import * as storage from './storage.ts';
import * as server from './server.ts';
import { GENERIC } from './generic.ts';
import { declared, type ErrorDeclaration } from './reft-error.ts';

export type { ErrorCode } from './reft-error.ts';

/**
 * The error catalogue: every error the server can answer with, one declaration each (code,
 * category, status, message template, problem type), grouped by area in this folder.
 */
export const AREAS = { request, model, interventions, training, tenants, storage, server } as const;

type Specific = (typeof AREAS)[keyof typeof AREAS];
type CodeOf<M> = M extends unknown ? { [K in keyof M]: M[K] extends { code: infer C extends string } ? C : never }[keyof M] : never;

declare module './reft-error.ts' {
  // ReftError's `code` is one of these: every area's specific codes and the generic ones
  interface DeclaredCodes extends Record<CodeOf<Specific> | keyof typeof GENERIC, true> {}
}

/** Every declaration, areas first (in the order above), then the generic ones. */
export const catalogue = (): readonly ErrorDeclaration[] => declared();
