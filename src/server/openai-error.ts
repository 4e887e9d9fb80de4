import { z } from 'zod';
import type { ReftError } from '../errors.ts';

/**
 * The error body OpenAI-compatible servers send, `{"error": {message, type, param, code}}`, for
 * the OpenAI routes: the official clients read `message`, `param` and `code` from it (an RFC 9457
 * body there reads as "no body"). Routes opt in with `config: { errorShape: 'openai' }`.
 */
declare module 'fastify' {
  interface FastifyContextConfig {
    errorShape?: 'openai';
  }
}

export const openaiErrorSchema = z
  .object({
    error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string().nullable() }),
  })
  .describe("The request was refused or failed (OpenAI's error shape); param names the field");

const TYPES: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  403: 'permission_error',
  404: 'not_found_error',
  409: 'conflict_error',
  413: 'invalid_request_error',
  415: 'invalid_request_error',
  429: 'rate_limit_error',
};

export function openaiErrorOf(err: ReftError): z.infer<typeof openaiErrorSchema> {
  const type = TYPES[err.status] ?? (err.status === 503 ? 'service_unavailable_error' : 'server_error');
  return { error: { message: err.message, type, param: err.field ?? null, code: err.code } };
}
