import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { interventionNameTaken, jobAlreadyFinished, jobNotFound, quotaActiveJobs, quotaInterventions } from '../../errors.ts';
import { CHECK_TRAINING_DATA, fileBytes } from '../../jobs/data.ts';
import { jobRequestSchema, jobSpec, type JobSpec } from '../../jobs/spec.ts';
import type { ModelRuntime } from '../runtime.ts';
import type { Job, JobEvent, Store } from '../../storage/store.ts';
import { SseStream } from '../sse.ts';
import { idParam, pageBody, pageQuery, pageSchema, problemSchema } from './schemas.ts';
import { ConcurrencyLimiter, type TenantLimits } from '../tenant-limits.ts';
import { DEFAULT_TRAIN_MEMORY_BUDGET, checkRowFits } from '../../training/memory.ts';

/**
 * Training jobs, shaped like OpenAI's fine-tuning jobs. The server validates and queues; a
 * worker process claims and trains; the result is an intervention of the tenant.
 */
const jobSchema = z.object({
  id: z.string(),
  object: z.literal('training.job'),
  status: z.enum(['queued', 'running', 'succeeded', 'failed', 'cancelled']),
  name: z.string().nullable(),
  training_file: z.string().nullable(),
  intervention: z.record(z.string(), z.unknown()),
  hyperparameters: z.record(z.string(), z.unknown()),
  progress: z.unknown(),
  error: z.string().nullable(),
  intervention_id: z.string().nullable(),
  attempts: z.number().int(),
  cancel_requested: z.boolean(),
  created_at: z.string(),
  started_at: z.string().nullable(),
  finished_at: z.string().nullable(),
});

const eventSchema = z.object({ seq: z.number().int(), type: z.string(), created_at: z.string(), data: z.unknown() });

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);

function jobBody(j: Job): z.infer<typeof jobSchema> {
  const spec = j.spec as JobSpec;
  const { kind, rank, layers, positions, share_weights, ...hyper } = spec.recipe;
  return {
    id: j.id,
    object: 'training.job',
    status: j.status,
    name: spec.name,
    training_file: 'file' in spec.data ? spec.data.file : null,
    intervention: { kind, rank, layers, positions, share_weights },
    hyperparameters: hyper,
    progress: j.progress ?? null,
    error: j.error,
    intervention_id: j.interventionId,
    attempts: j.attempts,
    cancel_requested: j.cancelRequested,
    created_at: j.createdAt,
    started_at: j.startedAt,
    finished_at: j.finishedAt,
  };
}

const eventBody = (e: JobEvent) => ({ seq: e.seq, type: e.type, created_at: e.createdAt, data: e.data });

/** Live event streams one tenant may hold open (each polls the store while it lasts). */
export const MAX_EVENT_STREAMS_PER_TENANT = 8;

export function trainingRoutes(
  app: FastifyInstance,
  store: Store,
  runtime: () => ModelRuntime,
  budgets: { maxTrainingChars: number; maxTrainingRows: number; trainMemoryBudget?: number },
  limits: TenantLimits,
): void {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const params = z.strictObject({ id: idParam });
  const streams = new ConcurrencyLimiter(MAX_EVENT_STREAMS_PER_TENANT, 'live training event streams');
  const find = async (tenantId: string, id: string) => {
    const job = await store.getJob(tenantId, id);
    if (!job) throw jobNotFound({ id }, 'id');
    return job;
  };

  r.post(
    '/v1/training/jobs',
    {
      schema: {
        summary: 'Create a training job',
        tags: ['training'],
        body: jobRequestSchema,
        response: { 202: jobSchema, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) => {
      const rt = runtime();
      const spec = jobSpec(request.body, rt.config);
      // quotas first: they cost one query, the data check below tokenizes every row
      const usage = await store.storedUsage(request.tenant.id);
      if (usage.activeJobs >= limits.maxActiveJobs) {
        throw quotaActiveJobs({ active: usage.activeJobs, limit: limits.maxActiveJobs }, 'training_file');
      }
      // each job adds an intervention when it succeeds: count the unfinished ones against the quota
      if (usage.interventions + usage.activeJobs >= limits.maxInterventions) {
        throw quotaInterventions({ stored: usage.interventions, unfinishedJobs: usage.activeJobs, limit: limits.maxInterventions }, 'name');
      }
      // Check every row now (off the event loop, within the text budgets), so a bad line is a 400
      // here rather than a failed job later.
      const data =
        'rows' in spec.data
          ? { rows: spec.data.rows }
          : { jsonl: await fileBytes(store, request.tenant.id, spec.data.file), field: 'training_file' };
      const { rows, longestTokens } = await rt.offload.run(CHECK_TRAINING_DATA, {
        modelDir: rt.modelDir,
        data,
        maxChars: budgets.maxTrainingChars,
        maxRows: budgets.maxTrainingRows,
      });
      // the worker splits batches to fit its memory budget; a row that alone exceeds it can never train
      checkRowFits(
        rt.config,
        longestTokens,
        budgets.trainMemoryBudget ?? DEFAULT_TRAIN_MEMORY_BUDGET,
        'jsonl' in data ? data.field : 'data',
      );
      if (spec.name && (await store.findIntervention(request.tenant.id, spec.name))?.tenantId === request.tenant.id) {
        throw interventionNameTaken({ name: spec.name }, 'name');
      }
      const job = await store.createJob(request.tenant.id, spec);
      request.log.info({ job: job.id, tenant: request.tenant.id, rows }, 'training job queued');
      return reply.status(202).send(jobBody(job));
    },
  );

  r.get(
    '/v1/training/jobs',
    {
      schema: {
        summary: "List the caller's training jobs, newest first",
        tags: ['training'],
        querystring: pageQuery,
        response: { 200: pageSchema(jobSchema), '4xx': problemSchema },
      },
    },
    async (request) => {
      const page = await store.listJobs(request.tenant.id, { ...request.query, order: 'desc' });
      return pageBody(page, jobBody);
    },
  );

  r.get(
    '/v1/training/jobs/:id',
    {
      schema: {
        summary: 'A training job: status, progress, metrics, error, the resulting intervention',
        tags: ['training'],
        params,
        response: { 200: jobSchema, '4xx': problemSchema },
      },
    },
    async (request) => jobBody(await find(request.tenant.id, request.params.id)),
  );

  r.post(
    '/v1/training/jobs/:id/cancel',
    {
      schema: {
        summary: 'Cancel a job (a running one stops within one step); a finished one is a 409',
        tags: ['training'],
        params,
        response: { 200: jobSchema, '4xx': problemSchema },
      },
    },
    async (request) => {
      const before = await find(request.tenant.id, request.params.id);
      if (TERMINAL.has(before.status)) throw jobAlreadyFinished({ id: before.id, status: before.status }, 'id');
      const job = await store.requestCancel(request.tenant.id, request.params.id);
      if (!job) throw jobNotFound({ id: request.params.id }, 'id');
      return jobBody(job);
    },
  );

  r.get(
    '/v1/training/jobs/:id/events',
    {
      schema: {
        summary:
          'Job events (step, loss, learning rate, tokens/s, time left); live server-sent events with stream=true or Accept: text/event-stream',
        tags: ['training'],
        params,
        querystring: z.strictObject({
          after: z.coerce.number().int().min(0).default(0),
          limit: z.coerce.number().int().min(1).max(1000).default(100),
          stream: z.enum(['true', 'false']).optional(),
        }),
        response: { 200: z.object({ object: z.literal('list'), data: z.array(eventSchema), has_more: z.boolean() }), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const job = await find(request.tenant.id, request.params.id);
      const { after, limit, stream } = request.query;
      const live = stream === 'true' || (stream === undefined && (request.headers.accept ?? '').includes('text/event-stream'));
      if (!live) {
        const events = await store.listJobEvents(job.id, after, limit + 1);
        return { object: 'list' as const, data: events.slice(0, limit).map(eventBody), has_more: events.length > limit };
      }
      const release = streams.acquire(request.tenant.id); // a 429 before the stream starts
      reply.raw.once('close', release);
      const sse = new SseStream(request, reply);
      let seq = after;
      // Events are polled: a worker may run on another host, and SQLite has no cross-process push.
      while (!sse.signal.aborted) {
        const events = await store.listJobEvents(job.id, seq, 500).catch(() => []);
        for (const e of events) {
          sse.send(eventBody(e));
          seq = e.seq;
        }
        if (events.length === 500) continue;
        const now = await store.getJob(request.tenant.id, job.id).catch(() => null);
        if (now && TERMINAL.has(now.status)) {
          const rest = await store.listJobEvents(job.id, seq, 1000).catch(() => []);
          for (const e of rest) sse.send(eventBody(e));
          sse.send({ type: 'end', job: jobBody(now) });
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
      sse.end();
    },
  );
}
