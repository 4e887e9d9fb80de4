import { createHash } from 'node:crypto';
import { isIdOf, newId } from './ids.ts';
import { jsonText } from './schema.ts';
import { noInterventionToReplace } from './store-errors.ts';
import type { InterventionFiles, InterventionMeta, NewIntervention } from './store.ts';

/**
 * The columns of an intervention row computed from its input: those of its InterventionMeta that
 * a write sets, with the config as JSON text.
 */
export interface InterventionRecord
  extends Pick<InterventionMeta, 'id' | 'tenantId' | 'name' | 'description' | 'source' | 'bytes' | 'sha256'> {
  /** reft_config.json as JSON text, for the config column. */
  config: string;
}

/**
 * The record `putIntervention` writes: under a new id, or under `replaceId` for a replace. An id
 * the store could not have made is refused at once as not_found (it names no row, and the SQLite
 * dialect must never put it into a file name).
 */
export function interventionRecord(iv: NewIntervention, replaceId?: string): InterventionRecord {
  if (replaceId !== undefined && !isIdOf('intervention', replaceId)) throw noInterventionToReplace(replaceId);
  return {
    id: replaceId ?? newId('intervention'),
    tenantId: iv.tenantId,
    name: iv.name,
    description: iv.description ?? null,
    source: iv.source,
    config: jsonText(iv.config),
    bytes: iv.files.config.byteLength + iv.files.weights.byteLength,
    sha256: interventionDigest(iv.files),
  };
}

/** sha256 of the config file's bytes followed by the weights file's bytes, in hex. */
function interventionDigest(files: InterventionFiles): string {
  return createHash('sha256').update(files.config).update(files.weights).digest('hex');
}
