import type { FastifyInstance } from 'fastify';
import sjson from 'secure-json-parse';
import { bodyEmpty, bodyNotJson } from '../errors.ts';
import type { OffloadPool } from '../offload/pool.ts';
import { offloadTask } from '../offload/task.ts';

/**
 * JSON bodies above this size are parsed in the offload pool: JSON.parse of a few MB holds the
 * event loop for tens of ms (a 4 MB prompt about 80 ms on a 2-core VM, with the body's copies),
 * during which no other tenant is answered. Smaller ones are parsed in place.
 */
export const OFFLOAD_JSON_BYTES = 256 * 1024;

/** A JSON body as fastify's own parser reads it (prototype poisoning refused), or body_not_json. */
function parseJsonBody(text: string): unknown {
  try {
    return sjson.parse(text, undefined, { protoAction: 'error', constructorAction: 'error' });
  } catch (e) {
    throw bodyNotJson({ reason: (e as Error).message }, 'body');
  }
}

/** `parseJsonBody` of a body's UTF-8 bytes, in an offload pool thread. */
export function parseJsonBytes(bytes: Uint8Array): unknown {
  return parseJsonBody(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'));
}

const PARSE_JSON_BYTES = offloadTask(import.meta.url, { parseJsonBytes });

/**
 * Replaces fastify's `application/json` parser (the byte limit still applies while reading). A
 * large body's bytes are moved, not copied, to the offload pool, which decodes and parses them
 * there, once the model's runtime (and with it the pool) is up.
 */
export function registerJsonBodyParser(app: FastifyInstance, offload: () => OffloadPool | null): void {
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, async (_request: unknown, body: string | Buffer) => {
    const bytes = typeof body === 'string' ? Buffer.from(body) : body;
    if (bytes.length === 0) throw bodyEmpty('body');
    const pool = bytes.length > OFFLOAD_JSON_BYTES ? offload() : null;
    if (!pool) return parseJsonBody(bytes.toString('utf8'));
    // bytes that own their whole buffer are moved to the thread rather than copied
    const owned = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    return pool.run(PARSE_JSON_BYTES, bytes, owned ? [bytes.buffer as ArrayBuffer] : []);
  });
}
