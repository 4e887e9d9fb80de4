/**
 * The storage every process shares (servers, training workers), and its contract
 * (test/support/store-contract.ts). One implementation over Kysely (sql-store.ts), two dialects.
 *
 * - Writes are all or nothing. Ids are opaque (prefix + random), safe in URLs and file names.
 * - Reads are tenant-scoped: another tenant's row reads as missing. `tenantId === null` means
 *   "shared only" for interventions and compositions, "any tenant" for `getJob` (workers).
 *   `readInterventionFiles` and `loadCheckpoint` are unscoped: callers find the row through a scoped method first.
 * - Pages (and the job queue) are in insertion order, exact within a millisecond; `listJobs`
 *   with order 'desc' is newest first. A cursor naming no visible row is invalid_request "after".
 * - A write naming a missing tenant, job or intervention is a not_found on that field (replacing
 *   an id the store could not have made, or another tenant's: on "id"); a taken name a conflict.
 * - Every status change appends a 'status' event, so followers see a job's whole life. A
 *   re-claim keeps `startedAt`; a flagged job whose lease expired is cancelled, not retried; one
 *   out of attempts fails.
 * - `recordUsage` adds to each tenant's row per day, in one transaction, never losing an
 *   increment between processes; entries of missing tenants are skipped, all-zero ones make no
 *   row, an invalid one is an invalid_request naming it (nothing written).
 * - Listeners fire in the writing process once, after its commit, and in others where the
 *   dialect can (PostgreSQL). Caches key on (id, version), read fresh by `findIntervention`.
 */
export type Tenant = { id: string; name: string; createdAt: string };

export interface ApiKey {
  id: string;
  tenantId: string;
  /** The secret's first characters, to tell keys apart (null for keys made before schema 3). */
  prefix: string | null;
  createdAt: string;
  revokedAt: string | null;
  /** To the minute or so (callers throttle `touchApiKey`). */
  lastUsedAt: string | null;
}

export type InterventionSource = 'upload' | 'training' | 'import' | 'shared';

export interface InterventionMeta {
  id: string;
  /** null for shared interventions every tenant can use. */
  tenantId: string | null;
  name: string;
  description: string | null;
  source: InterventionSource;
  /** reft_config.json, parsed (for listing without reading the files). */
  config: unknown;
  /** Bumped on every replacement: caches key on (id, version). */
  version: number;
  /** The files' total bytes, and the digest of the config's bytes then the weights'. */
  bytes: number;
  sha256: string;
  createdAt: string;
  updatedAt: string;
}

export type InterventionFiles = { config: Uint8Array; weights: Uint8Array };

export interface NewIntervention {
  tenantId: string | null;
  name: string;
  description?: string | null;
  source: InterventionSource;
  config: unknown;
  files: InterventionFiles;
}

/** One intervention of a composition, and how it is applied. */
export interface CompositionItem {
  /** A stored intervention's id (resolved before saving): deleting it is refused while a composition uses it. */
  intervention: string;
  strength?: number;
  layers?: number[];
  positions?: string;
}

/** Interventions saved to be applied together, scoped and named as interventions are. */
export type Composition = {
  id: string;
  tenantId: string | null;
  name: string;
  items: CompositionItem[];
  createdAt: string;
  updatedAt: string;
};
export type NewComposition = Pick<Composition, 'tenantId' | 'name' | 'items'>;

/** `nextCursor`: pass as `after` for the next page; null on the last page. */
export type Page<T> = { data: T[]; nextCursor: string | null };

export interface PageRequest {
  limit: number;
  after?: string;
  /** 'asc' (default): oldest first; 'desc': newest first, `after` then means "older than" (listJobs only). */
  order?: 'asc' | 'desc';
}

/** What a tenant has stored: interventions and their files' bytes, training data files and theirs, jobs queued or running. */
export type StoredUsage = { interventions: number; bytes: number; files: number; fileBytes: number; activeJobs: number };

/** What a tenant used on one UTC day (YYYY-MM-DD): `recordUsage` adds these, `getUsage` returns the sums. */
export type UsageRecord = {
  tenantId: string;
  day: string;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  trainingTokens: number;
};
export type UsageDay = Omit<UsageRecord, 'tenantId'>;

export type StoredFile = { id: string; tenantId: string; filename: string; purpose: string; bytes: number; createdAt: string };

export const JOB_STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];

export interface Job {
  id: string;
  tenantId: string;
  status: JobStatus;
  /** The validated job request (recipe, data reference, name). */
  spec: unknown;
  /** Latest progress/metrics as the worker reports them. */
  progress: unknown;
  error: string | null;
  interventionId: string | null;
  attempts: number;
  cancelRequested: boolean;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
}

/** `type`: 'status' | 'metrics' | 'log' ... */
export type JobEvent = { seq: number; jobId: string; createdAt: string; type: string; data: unknown };

/** How a worker ends a job it holds. */
export type JobOutcome = { status: 'succeeded'; interventionId: string } | { status: 'failed'; error: string } | { status: 'cancelled' };

/** `expiresAt`: epoch ms when the lease expires unless renewed. */
export type Lease = { jobId: string; workerId: string; expiresAt: number };

/** The store's surface, whose contract is above; SqlStore (sql-store.ts) implements it. */
export interface Store {
  createTenant(name: string): Promise<Tenant>;
  renameTenant(id: string, name: string): Promise<Tenant | null>;
  /** Deletes a tenant and all it owns (keys, interventions, compositions, files, jobs, usage); false if there is none. */
  deleteTenant(id: string): Promise<boolean>;
  getTenant(id: string): Promise<Tenant | null>;
  listTenants(page: PageRequest): Promise<Page<Tenant>>;
  /** Stores a key by the hash of its secret (and its prefix); the secret itself is never stored. */
  createApiKey(tenantId: string, secretHash: string, prefix?: string): Promise<ApiKey>;
  /** The live key and its tenant for a secret's hash, or null (unknown or revoked). */
  findApiKey(secretHash: string): Promise<{ key: ApiKey; tenant: Tenant } | null>;
  /** A tenant's keys, revoked ones too, oldest first. */
  listApiKeys(tenantId: string): Promise<ApiKey[]>;
  touchApiKey(id: string): Promise<void>;
  /** True only when it revoked a live key. */
  revokeApiKey(id: string): Promise<boolean>;
  /** Creates one; with `replaceId`, replaces that one's files in place (same id, version + 1). */
  putIntervention(iv: NewIntervention, replaceId?: string): Promise<InterventionMeta>;
  /** One the tenant can see (its own or shared), by id or by name (its own first). */
  findIntervention(tenantId: string | null, idOrName: string): Promise<InterventionMeta | null>;
  listInterventions(tenantId: string | null, page: PageRequest): Promise<Page<InterventionMeta>>;
  readInterventionFiles(id: string): Promise<InterventionFiles | null>;
  /** Deletes the tenant's own (shared ones only with tenantId null); one a composition uses is intervention_in_use. */
  deleteIntervention(tenantId: string | null, id: string): Promise<boolean>;
  storedUsage(tenantId: string): Promise<StoredUsage>;
  /** Every item's intervention must be one the tenant can see: else intervention_not_found on "items[i].intervention". */
  putComposition(c: NewComposition, replaceId?: string): Promise<Composition>;
  findComposition(tenantId: string | null, idOrName: string): Promise<Composition | null>;
  listCompositions(tenantId: string | null, page: PageRequest): Promise<Page<Composition>>;
  deleteComposition(tenantId: string | null, id: string): Promise<boolean>;
  recordUsage(entries: UsageRecord[]): Promise<void>;
  /** The days with a row in [from, to], ascending. */
  getUsage(tenantId: string, from: string, to: string): Promise<UsageDay[]>;
  putFile(tenantId: string, filename: string, purpose: string, bytes: Uint8Array): Promise<StoredFile>;
  getFile(tenantId: string, id: string): Promise<StoredFile | null>;
  readFile(tenantId: string, id: string): Promise<Uint8Array | null>;
  listFiles(tenantId: string, page: PageRequest): Promise<Page<StoredFile>>;
  deleteFile(tenantId: string, id: string): Promise<boolean>;
  createJob(tenantId: string, spec: unknown): Promise<Job>;
  getJob(tenantId: string | null, id: string): Promise<Job | null>;
  listJobs(tenantId: string, page: PageRequest): Promise<Page<Job>>;
  /** Marks a job for cancellation; a queued job is cancelled at once. */
  requestCancel(tenantId: string, id: string): Promise<Job | null>;
  /** Atomically takes the next queued job (or one whose lease expired) for `workerId`. */
  claimJob(workerId: string, leaseMs: number, maxAttempts: number): Promise<{ job: Job; lease: Lease } | null>;
  /** Worker writes (renewLease, updateProgress, saveCheckpoint, finishJob): false if the worker no longer holds the lease (expired and re-claimed). */
  renewLease(jobId: string, workerId: string, leaseMs: number): Promise<boolean>;
  updateProgress(jobId: string, workerId: string, progress: unknown): Promise<boolean>;
  appendJobEvent(jobId: string, type: string, data: unknown): Promise<JobEvent>;
  listJobEvents(jobId: string, afterSeq: number, limit: number): Promise<JobEvent[]>;
  saveCheckpoint(jobId: string, workerId: string, step: number, state: Uint8Array): Promise<boolean>;
  loadCheckpoint(jobId: string): Promise<{ step: number; state: Uint8Array } | null>;
  finishJob(jobId: string, workerId: string, outcome: JobOutcome): Promise<boolean>;
  /** Jobs of every tenant, per status. */
  countJobs(): Promise<Record<JobStatus, number>>;
  /** Called when an intervention is deleted or replaced (by any process sharing the store). */
  onInterventionChanged(listener: (id: string) => void): () => void;
  /** Called when a job is queued (wakes idle workers). */
  onJobQueued(listener: () => void): () => void;
  close(): Promise<void>;
}
