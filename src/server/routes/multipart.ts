import '@fastify/multipart';
import type { FastifyRequest } from 'fastify';
import { multipartExpected, multipartPartRepeated, multipartPartTooLarge, multipartPartUnknown, uploadTooLarge } from '../../errors.ts';

export interface UploadParts {
  files: Map<string, { filename: string; bytes: Uint8Array }[]>;
  fields: Map<string, string>;
}

/**
 * What one route accepts in a multipart body: for each part name, how many parts and how many
 * bytes each. Parts are read as they stream in: an unknown or surplus part, or one over its size,
 * is refused as soon as it starts or crosses the limit, never buffered first.
 */
export interface MultipartSpec {
  parts: Record<string, { count: number; maxBytes: number }>;
  /** Bytes of all parts together (files and fields). */
  maxTotalBytes: number;
}

/** Largest plain (non-file) field: names, flags, a pyreft config.json given inline. */
const MAX_FIELD_BYTES = 1024 * 1024;

export async function readMultipart(request: FastifyRequest, spec: MultipartSpec): Promise<UploadParts> {
  if (!request.isMultipart()) throw multipartExpected('content-type');
  try {
    return await readParts(request, spec);
  } catch (e) {
    // The rest of the body is not kept: discard what still arrives (no memory) so the client's
    // upload completes and it reads the answer, rather than a stuck connection. Closing instead
    // makes most clients fail the write (EPIPE) and never see the answer.
    request.raw.unpipe();
    request.raw.resume();
    throw e;
  }
}

async function readParts(request: FastifyRequest, spec: MultipartSpec): Promise<UploadParts> {
  const names = Object.keys(spec.parts);
  const files = new Map<string, { filename: string; bytes: Uint8Array }[]>();
  const fields = new Map<string, string>();
  const seen = new Map<string, number>();
  let total = 0;
  const maxCount = names.reduce((n, k) => n + spec.parts[k].count, 0);
  // one over each count: the surplus part reaches the check below (which stops the parser) rather than busboy skipping through the rest
  const limits = {
    files: maxCount + 1,
    fields: names.length + 1,
    parts: maxCount + names.length + 1,
    fieldSize: MAX_FIELD_BYTES,
    fileSize: Math.max(...names.map((k) => spec.parts[k].maxBytes)) + 1,
  }; // +1: our own check names the part
  for await (const part of request.parts({ limits })) {
    const allowed = spec.parts[part.fieldname];
    if (!allowed) throw multipartPartUnknown({ part: part.fieldname, expected: names }, part.fieldname);
    const count = (seen.get(part.fieldname) ?? 0) + 1;
    seen.set(part.fieldname, count);
    if (count > allowed.count) throw multipartPartRepeated({ part: part.fieldname, times: allowed.count }, part.fieldname);
    if (part.type === 'file') {
      const chunks: Buffer[] = [];
      let size = 0;
      for await (const chunk of part.file as AsyncIterable<Buffer>) {
        size += chunk.byteLength;
        total += chunk.byteLength;
        if (size > allowed.maxBytes) throw partTooLarge('part', part.fieldname, allowed.maxBytes);
        if (total > spec.maxTotalBytes) throw uploadTooLarge({ limit: spec.maxTotalBytes }, part.fieldname);
        chunks.push(chunk);
      }
      if ((part.file as { truncated?: boolean }).truncated) throw partTooLarge('part', part.fieldname, allowed.maxBytes);
      const joined = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size); // one copy at most
      const list = files.get(part.fieldname) ?? [];
      list.push({ filename: part.filename, bytes: new Uint8Array(joined.buffer, joined.byteOffset, joined.byteLength) });
      files.set(part.fieldname, list);
    } else {
      if (part.valueTruncated) throw partTooLarge('field', part.fieldname, MAX_FIELD_BYTES);
      const value = String(part.value);
      total += Buffer.byteLength(value);
      if (Buffer.byteLength(value) > allowed.maxBytes) throw partTooLarge('field', part.fieldname, allowed.maxBytes);
      if (total > spec.maxTotalBytes) throw uploadTooLarge({ limit: spec.maxTotalBytes }, part.fieldname);
      fields.set(part.fieldname, value);
    }
  }
  return { files, fields };
}

const partTooLarge = (what: 'part' | 'field', part: string, limit: number) => multipartPartTooLarge({ what, part, limit }, part);

export const MAX_CONFIG_BYTES = 1024 * 1024;
/** Short text fields (names, descriptions, flags). */
const MAX_TEXT_FIELD_BYTES = 8 * 1024;
export const TEXT_FIELDS = (names: string[]) => Object.fromEntries(names.map((n) => [n, { count: 1, maxBytes: MAX_TEXT_FIELD_BYTES }]));
