import { interventionNameTaken, nameInvalid, quotaInterventionBytes, quotaInterventions } from '../errors.ts';
import { CHECK_ARTIFACT, type BaseModelShape } from '../interventions/artifact.ts';
import type { OffloadPool } from '../offload/pool.ts';
import type { InterventionMeta, Store } from '../storage/store.ts';
import { idParam } from './routes/schemas.ts';
import type { TenantLimits } from './tenant-limits.ts';

/**
 * Storing a tenant's intervention artifact, whichever route it came in by (an upload, a pyreft
 * import): validated completely for the base model, named, within the tenant's quotas.
 */
export interface InterventionServiceDeps {
  store: Store;
  offload: () => OffloadPool;
  base: () => BaseModelShape;
  limits: TenantLimits;
}

const nameSchema = idParam.describe('intervention name: letters, digits, "_", "." or "-"');

function parseName(raw: string | undefined, fallback: string | undefined, field = 'name'): string {
  const name = raw ?? fallback ?? `intervention-${Date.now().toString(36)}`;
  const ok = nameSchema.safeParse(name);
  if (!ok.success) throw nameInvalid({ field, problem: ok.error.issues[0].message }, field);
  return name;
}

/** Stores a validated artifact for a tenant: quota checks, name conflicts, replacement. */
export async function storeArtifact(
  deps: InterventionServiceDeps,
  tenantId: string,
  files: { config: Uint8Array; weights: Uint8Array },
  opts: { name?: string; description?: string; replace: boolean; source: 'upload' | 'import' },
): Promise<{ meta: InterventionMeta; created: boolean }> {
  // checking every value (orthonormal rows, finite) costs rank²·d: off the event loop
  const base = deps.base();
  const artifact = {
    config: await deps.offload().run(CHECK_ARTIFACT, {
      config: files.config,
      weights: files.weights,
      base: { hiddenSize: base.hiddenSize, numLayers: base.numLayers },
    }),
  };
  const name = parseName(opts.name, artifact.config.name);
  const existing = await deps.store.findIntervention(tenantId, name);
  const replaceId = existing && existing.tenantId === tenantId && existing.name === name ? existing.id : undefined;
  if (replaceId && !opts.replace) throw interventionNameTaken({ name, hint: 'pass replace=true to replace it' }, 'name');
  // a composition of this name would be shadowed wherever a request names it
  if (await deps.store.findComposition(tenantId, name))
    throw interventionNameTaken({ name, hint: 'a composition has it; an intervention cannot take its name' }, 'name');
  const usage = await deps.store.storedUsage(tenantId);
  const bytes = files.config.byteLength + files.weights.byteLength;
  const freed = replaceId ? existing!.bytes : 0;
  if (!replaceId && usage.interventions >= deps.limits.maxInterventions) {
    throw quotaInterventions({ stored: usage.interventions, limit: deps.limits.maxInterventions }, 'weights');
  }
  if (usage.bytes - freed + bytes > deps.limits.maxInterventionBytes) {
    throw quotaInterventionBytes({ bytes, limit: deps.limits.maxInterventionBytes }, 'weights');
  }
  const meta = await deps.store.putIntervention(
    {
      tenantId,
      name,
      description: opts.description ?? artifact.config.description ?? null,
      source: opts.source,
      config: artifact.config,
      files,
    },
    replaceId,
  );
  return { meta, created: !replaceId };
}
