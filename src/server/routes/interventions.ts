import { createHash } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { flagInvalid, interventionNotFound, interventionShared, multipartPartMissing, multipartPartRepeated } from '../../errors.ts';
import { CONFIG_FILE, WEIGHTS_FILE } from '../../interventions/directory.ts';
import type { InterventionMeta } from '../../storage/store.ts';
import { storeArtifact, type InterventionServiceDeps } from '../intervention-service.ts';
import { idParam, pageBody, pageQuery, pageSchema, problemSchema } from './schemas.ts';
import { MAX_CONFIG_BYTES, TEXT_FIELDS, readMultipart, type UploadParts } from './multipart.ts';

/**
 * Upload, list, read, download and delete interventions. An upload is validated completely
 * against the base model before anything is stored, and the store writes it atomically.
 */
export const interventionSchema = z.object({
  id: z.string(),
  object: z.literal('intervention'),
  name: z.string(),
  description: z.string().nullable(),
  shared: z.boolean(),
  source: z.string(),
  version: z.number().int(),
  bytes: z.number().int(),
  sha256: z.string(),
  config: z.unknown(),
  created_at: z.string(),
  updated_at: z.string(),
});

export function interventionBody(m: InterventionMeta): z.infer<typeof interventionSchema> {
  return {
    id: m.id,
    object: 'intervention',
    name: m.name,
    description: m.description,
    shared: m.tenantId === null,
    source: m.source,
    version: m.version,
    bytes: m.bytes,
    sha256: m.sha256,
    config: m.config,
    created_at: m.createdAt,
    updated_at: m.updatedAt,
  };
}

/** A part given either as a file or as a plain field. */
function onePart(parts: UploadParts, name: string, required: true): Uint8Array;
function onePart(parts: UploadParts, name: string, required: false): Uint8Array | undefined;
function onePart(parts: UploadParts, name: string, required: boolean): Uint8Array | undefined {
  const files = parts.files.get(name) ?? [];
  const field = parts.fields.get(name);
  if (files.length + (field === undefined ? 0 : 1) > 1) throw multipartPartRepeated({ part: name, times: 1 }, name);
  if (files.length) return files[0].bytes;
  if (field !== undefined) return new TextEncoder().encode(field);
  if (required) throw multipartPartMissing({ part: name }, name);
  return undefined;
}

export function parseBool(raw: string | undefined, field: string, fallback: boolean): boolean {
  if (raw === undefined) return fallback;
  if (raw === 'true') return true;
  if (raw === 'false') return false;
  throw flagInvalid({ field }, field);
}

/** What the intervention routes need: the service's dependencies and the upload limit. */
export interface InterventionRouteDeps extends InterventionServiceDeps {
  /** Largest uploaded file (bytes). */
  uploadLimit: number;
}

export function interventionRoutes(app: FastifyInstance, deps: InterventionRouteDeps): void {
  const r = app.withTypeProvider<ZodTypeProvider>();
  const { store } = deps;
  const params = z.strictObject({ id: idParam });

  r.post(
    '/v1/interventions',
    {
      schema: {
        summary:
          'Upload an intervention (multipart: config = reft_config.json, weights = reft_weights.safetensors, optional name, description, replace)',
        tags: ['interventions'],
        consumes: ['multipart/form-data'],
        response: { 200: interventionSchema, 201: interventionSchema, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) => {
      const parts = await readMultipart(request, {
        parts: {
          config: { count: 1, maxBytes: MAX_CONFIG_BYTES },
          weights: { count: 1, maxBytes: deps.uploadLimit },
          ...TEXT_FIELDS(['name', 'description', 'replace']),
        },
        maxTotalBytes: deps.uploadLimit + MAX_CONFIG_BYTES,
      });
      const files = { config: onePart(parts, 'config', true), weights: onePart(parts, 'weights', true) };
      const { meta, created } = await storeArtifact(deps, request.tenant.id, files, {
        name: parts.fields.get('name'),
        description: parts.fields.get('description'),
        replace: parseBool(parts.fields.get('replace'), 'replace', false),
        source: 'upload',
      });
      request.log.info({ intervention: meta.id, tenant: request.tenant.id, bytes: meta.bytes, replaced: !created }, 'intervention stored');
      return reply.status(created ? 201 : 200).send(interventionBody(meta));
    },
  );

  r.get(
    '/v1/interventions',
    {
      schema: {
        summary: 'List the interventions the caller can use',
        tags: ['interventions'],
        querystring: pageQuery,
        response: { 200: pageSchema(interventionSchema), '4xx': problemSchema },
      },
    },
    async (request) => {
      const page = await store.listInterventions(request.tenant.id, request.query);
      return pageBody(page, interventionBody);
    },
  );

  r.get(
    '/v1/interventions/:id',
    {
      schema: {
        summary: 'An intervention by id or name',
        tags: ['interventions'],
        params,
        response: { 200: interventionSchema, '4xx': problemSchema },
      },
    },
    async (request) => {
      const meta = await store.findIntervention(request.tenant.id, request.params.id);
      if (!meta) throw interventionNotFound({ id: request.params.id }, 'id');
      return interventionBody(meta);
    },
  );

  r.get(
    '/v1/interventions/:id/files/:file',
    {
      schema: {
        summary: 'Download one of the two artifact files, byte-identical to what was stored',
        tags: ['interventions'],
        params: z.strictObject({ id: idParam, file: z.enum([CONFIG_FILE, WEIGHTS_FILE]) }),
        response: { 200: z.any().describe('the file bytes'), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const meta = await store.findIntervention(request.tenant.id, request.params.id);
      const files = meta && (await store.readInterventionFiles(meta.id));
      if (!meta || !files) throw interventionNotFound({ id: request.params.id }, 'id');
      const isConfig = request.params.file === CONFIG_FILE;
      const bytes = isConfig ? files.config : files.weights;
      return reply
        .type(isConfig ? 'application/json' : 'application/octet-stream')
        .header('content-disposition', `attachment; filename="${request.params.file}"`)
        .header('etag', `"${createHash('sha256').update(bytes).digest('hex')}"`)
        .send(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    },
  );

  r.delete(
    '/v1/interventions/:id',
    {
      schema: {
        summary: "Delete one of the caller's interventions",
        tags: ['interventions'],
        params,
        response: { 204: z.null(), '4xx': problemSchema },
      },
    },
    async (request, reply) => {
      const meta = await store.findIntervention(request.tenant.id, request.params.id);
      // Shared interventions are visible to every tenant but belong to none of them.
      if (meta && meta.tenantId === null) {
        throw interventionShared({ id: request.params.id }, 'id');
      }
      if (!meta || meta.tenantId !== request.tenant.id || !(await store.deleteIntervention(request.tenant.id, meta.id))) {
        throw interventionNotFound({ id: request.params.id }, 'id');
      }
      request.log.info({ intervention: meta.id, tenant: request.tenant.id }, 'intervention deleted');
      return reply.status(204).send(null);
    },
  );
}
