import type { FastifyInstance } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { fileNotFound, filePartCount, filePurposeInvalid, quotaFileBytes } from '../../errors.ts';
import { COUNT_JSONL_ROWS } from '../../jobs/data.ts';
import type { ModelRuntime } from '../runtime.ts';
import type { Store, StoredFile } from '../../storage/store.ts';
import { TEXT_FIELDS, readMultipart } from './multipart.ts';
import { idParam, pageBody, pageQuery, pageSchema, problemSchema } from './schemas.ts';

/** Training data files (JSONL), validated row by row when uploaded. */
export const fileSchema = z.object({
  id: z.string(),
  object: z.literal('file'),
  filename: z.string(),
  purpose: z.string(),
  bytes: z.number().int(),
  rows: z.number().int().optional(),
  created_at: z.string(),
});

const fileBody = (f: StoredFile, rows?: number): z.infer<typeof fileSchema> => ({
  id: f.id,
  object: 'file',
  filename: f.filename,
  purpose: f.purpose,
  bytes: f.bytes,
  ...(rows === undefined ? {} : { rows }),
  created_at: f.createdAt,
});

export function fileRoutes(
  app: FastifyInstance,
  store: Store,
  o: { uploadLimit: number; maxRows: number; maxFileBytes: number; runtime: () => ModelRuntime },
): void {
  const { uploadLimit } = o;
  const r = app.withTypeProvider<ZodTypeProvider>();
  const params = z.strictObject({ id: idParam });

  r.post(
    '/v1/files',
    {
      schema: {
        summary: 'Upload training data (multipart: file = JSONL of {"prompt","completion"} or {"messages"} rows, purpose = fine-tune)',
        tags: ['training'],
        consumes: ['multipart/form-data'],
        response: { 201: fileSchema, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) => {
      const parts = await readMultipart(request, {
        parts: { file: { count: 1, maxBytes: uploadLimit }, ...TEXT_FIELDS(['purpose']) },
        maxTotalBytes: uploadLimit + 1024,
      });
      const files = parts.files.get('file') ?? [];
      if (files.length !== 1) throw filePartCount({ given: files.length }, 'file');
      const purpose = parts.fields.get('purpose') ?? 'fine-tune';
      if (purpose !== 'fine-tune') throw filePurposeInvalid('purpose');
      const held = (await store.storedUsage(request.tenant.id)).fileBytes;
      if (held + files[0].bytes.byteLength > o.maxFileBytes) {
        throw quotaFileBytes({ bytes: files[0].bytes.byteLength, limit: o.maxFileBytes }, 'file');
      }
      const rows = await o.runtime().offload.run(COUNT_JSONL_ROWS, { bytes: files[0].bytes, field: 'file', maxRows: o.maxRows });
      const filename = files[0].filename.replace(/[^\w.-]/g, '_').slice(0, 200) || 'data.jsonl';
      const stored = await store.putFile(request.tenant.id, filename, purpose, files[0].bytes);
      request.log.info({ file: stored.id, tenant: request.tenant.id, rows }, 'training file stored');
      return reply.status(201).send(fileBody(stored, rows));
    },
  );

  r.get(
    '/v1/files',
    {
      schema: {
        summary: "List the caller's files",
        tags: ['training'],
        querystring: pageQuery,
        response: { 200: pageSchema(fileSchema), '4xx': problemSchema },
      },
    },
    async (request) => {
      const page = await store.listFiles(request.tenant.id, request.query);
      return pageBody(page, (f) => fileBody(f));
    },
  );

  r.get(
    '/v1/files/:id',
    {
      schema: { summary: 'A file', tags: ['training'], params, response: { 200: fileSchema, '4xx': problemSchema } },
    },
    async (request) => {
      const f = await store.getFile(request.tenant.id, request.params.id);
      if (!f) throw fileNotFound({ id: request.params.id }, 'id');
      return fileBody(f);
    },
  );

  r.delete(
    '/v1/files/:id',
    {
      schema: { summary: 'Delete a file', tags: ['training'], params, response: { 204: z.null(), '4xx': problemSchema } },
    },
    async (request, reply) => {
      if (!(await store.deleteFile(request.tenant.id, request.params.id))) throw fileNotFound({ id: request.params.id }, 'id');
      return reply.status(204).send(null);
    },
  );
}
