import { ReftError, noSuch, notFound } from '../errors.ts';

/**
 * The errors the store raises for the same mistakes (see the contract in store.ts), so callers
 * see the same code, message and field whichever dialect runs.
 */

/** A write named a tenant that does not exist. */
export const noTenant = (tenantId: string | null): ReftError => noSuch('tenant', String(tenantId), 'tenantId');

/** A write named a job that does not exist. */
export const noJob = (jobId: string): ReftError => noSuch('job', jobId, 'jobId');

/** A write named an intervention (a finished job's) that does not exist. */
export const noIntervention = (interventionId: string | null): ReftError =>
  noSuch('intervention', String(interventionId), 'interventionId');

/** A replace named an id that is not one of the tenant's interventions (or not an id at all). */
export const noInterventionToReplace = (id: string): ReftError => notFound(`no intervention "${id}" to replace`, 'id');

/** Another intervention of the same owner (or another shared one) has the name. */
export const interventionNameTaken = (name: string): ReftError =>
  new ReftError('conflict', `an intervention named "${name}" already exists`, 'name');

/** Another API key has the same secret hash (a reused secret; random ones never collide). */
export const keySecretTaken = (): ReftError => new ReftError('conflict', 'a key with this secret already exists', 'secretHash');
