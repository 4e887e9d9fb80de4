import { defineError } from './reft-error.ts';

/** Auth and tenants: API keys, the admin key, per-tenant rate limits and quotas. */

// keys
export const apiKeyMissing = defineError('api_key_missing', 'unauthorized', () => 'missing API key: send "Authorization: Bearer <key>"');
export const apiKeyInvalid = defineError('api_key_invalid', 'unauthorized', () => 'invalid or revoked API key');
export const apiKeyTaken = defineError('api_key_taken', 'conflict', () => 'a key with this secret already exists');
export const adminKeyRequired = defineError('admin_key_required', 'forbidden', () => 'this route needs the admin key');
export const tenantKeyRequired = defineError(
  'tenant_key_required',
  'forbidden',
  () => 'this route needs a tenant API key; the admin key only administers tenants (/v1/admin)',
);
export const metricsKeyRequired = defineError(
  'metrics_key_required',
  'unauthorized',
  () => 'the metrics need the metrics key: send "Authorization: Bearer <REFT_METRICS_KEY>"',
);
export const adminOff = defineError(
  'admin_off',
  'not_found',
  () => 'tenant administration is off: the server runs single-tenant (set REFT_ADMIN_KEY)',
);
export const failedKeysRateLimited = defineError(
  'failed_keys_rate_limited',
  'rate_limited',
  (p: { limit: number }) => `too many failed API keys from this address (limit ${p.limit} a minute)`,
);

// tenants
export const tenantNotFound = defineError('tenant_not_found', 'not_found', (p: { id: string }) => `no tenant "${p.id}"`);
export const tenantNameTaken = defineError(
  'tenant_name_taken',
  'conflict',
  (p: { name: string }) => `a tenant named "${p.name}" already exists`,
);
export const keyNotFound = defineError('key_not_found', 'not_found', (p: { id: string }) => `no key "${p.id}"`);

// per-tenant limits: concurrency is retried (429), a full quota stays full until something is deleted (403)
export const tenantConcurrencyLimited = defineError(
  'tenant_concurrency_limited',
  'rate_limited',
  (p: { what: string; limit: number }) => `too many ${p.what} for this tenant (limit ${p.limit})`,
);
export const quotaInterventions = defineError(
  'quota_interventions',
  'quota_exceeded',
  (p: { stored: number; unfinishedJobs?: number; limit: number }) =>
    p.unfinishedJobs === undefined
      ? `this tenant already stores ${p.stored} interventions (limit ${p.limit})`
      : `this tenant stores ${p.stored} interventions and has ${p.unfinishedJobs} training jobs unfinished (limit ${p.limit} interventions)`,
);
export const quotaInterventionBytes = defineError(
  'quota_intervention_bytes',
  'quota_exceeded',
  (p: { bytes: number; limit: number }) => `storing ${p.bytes} bytes would exceed this tenant's ${p.limit}-byte quota`,
);
export const quotaFileBytes = defineError(
  'quota_file_bytes',
  'quota_exceeded',
  (p: { bytes: number; limit: number }) => `storing ${p.bytes} bytes would exceed this tenant's ${p.limit}-byte training-file quota`,
);
export const quotaActiveJobs = defineError(
  'quota_active_jobs',
  'quota_exceeded',
  (p: { active: number; limit: number }) => `this tenant has ${p.active} training jobs queued or running (limit ${p.limit})`,
);
export const tenantQueueFull = defineError(
  'tenant_queue_full',
  'rate_limited',
  (p: { limit: number; queued: number }) =>
    `too many concurrent requests for this tenant (limit ${p.limit}), and its queue of ${p.queued} (--tenant-max-queued) is full`,
);
export const clientDisconnectedWhileQueued = defineError(
  'client_disconnected_while_queued',
  'invalid_request',
  () => 'the client disconnected while the request was queued',
);
