import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod';
import {
  ReftError,
  bodyEmpty,
  bodyInvalid,
  bodyNotJson,
  bodyTooLarge,
  mediaTypeUnsupported,
  multipartExpected,
  requestRefused,
  routeNotFound,
  type ErrorCode,
  type Category,
} from '../errors.ts';
import { openaiErrorOf } from './openai-error.ts';

/**
 * RFC 9457 problem details for every error the server sends: typed ReftErrors keep their code
 * and field; fastify's own errors (validation, body limits, bad JSON) are mapped; anything else
 * is a 500 whose details stay in the log, never in the response. The OpenAI routes get the same
 * errors in OpenAI's shape.
 */
export interface Problem {
  /** The catalogue entry's page: GET /problems/{code}, relative to this server (RFC 9457 §3.1.1). */
  type: string;
  /** The entry's short summary, the same for every occurrence. */
  title: string;
  status: number;
  detail: string;
  /** The specific error (the catalogue's code): what clients and tests key on. */
  code: ErrorCode;
  /** Its general kind (invalid_request, not_found, …), which the status and the OpenAI `type` follow. */
  category: Category;
  field?: string;
  instance?: string;
}

export function problemOf(err: ReftError, instance?: string): Problem {
  return {
    type: err.type,
    title: err.title,
    status: err.status,
    // an internal error's own words may be an engine's or a driver's: never sent (see publicError)
    detail: err.category === 'internal' && !err.message.startsWith('internal server error') ? 'internal server error' : err.message,
    code: err.code,
    category: err.category,
    ...(err.field ? { field: err.field } : {}),
    ...(instance ? { instance } : {}),
  };
}

export function sendProblem(reply: FastifyReply, err: ReftError, instance?: string): FastifyReply {
  if (err.retryAfterSeconds !== undefined) reply.header('retry-after', String(Math.ceil(err.retryAfterSeconds)));
  if (reply.request.routeOptions.config?.errorShape === 'openai')
    return reply.status(err.status).type('application/json').send(openaiErrorOf(err));
  return reply.status(err.status).type('application/problem+json').send(problemOf(err, instance));
}

/** Maps anything thrown in a handler to a ReftError. */
export function toReftError(err: unknown): ReftError {
  if (err instanceof ReftError) return err;
  const e = err as FastifyError & { statusCode?: number };
  if (hasZodFastifySchemaValidationErrors(e)) {
    const issue = e.validation[0];
    const where = e.validationContext ?? 'body';
    const path = (issue.instancePath ?? '').replace(/^\//, '').replaceAll('/', '.');
    const params = issue.params as { keys?: string[] };
    const unknownKey = issue.keyword === 'unrecognized_keys' ? params?.keys?.[0] : undefined;
    const field = [path, unknownKey].filter(Boolean).join('.') || where;
    const message = unknownKey ? `unknown field "${unknownKey}"` : (issue.message ?? 'is invalid');
    return bodyInvalid({ where: where === 'body' ? '' : `${where} `, field, problem: message }, field);
  }
  switch (e.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
    case 'FST_REQ_FILE_TOO_LARGE':
    case 'FST_PARTS_LIMIT':
    case 'FST_FILES_LIMIT':
    case 'FST_FIELDS_LIMIT':
      return bodyTooLarge({ reason: e.message });
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return mediaTypeUnsupported({ reason: e.message }, 'content-type');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return bodyEmpty('body');
    case 'FST_INVALID_MULTIPART_CONTENT_TYPE':
      return multipartExpected('content-type');
  }
  if (e instanceof SyntaxError || e.code === 'FST_ERR_CTP_INVALID_JSON_BODY') {
    return bodyNotJson({ reason: e.message }, 'body');
  }
  if (e.statusCode === 404) return new ReftError('not_found', e.message);
  if (e.statusCode === 413) return bodyTooLarge({ reason: e.message });
  if (e.statusCode === 415) return mediaTypeUnsupported({ reason: e.message });
  if (e.statusCode && e.statusCode >= 400 && e.statusCode < 500) return requestRefused({ reason: e.message });
  return new ReftError('internal', 'internal server error');
}

/** Addresses, ports, paths, errno names and stack frames: what a server's own failures leak. */
const INTERNALS = /\b\d{1,3}(\.\d{1,3}){3}\b|\[[0-9a-f:]+\]|:\d{2,5}\b|(^|[\s"'(])\/[\w.@-]+\/|\bE[A-Z]{3,}\b|\bat .+\(/;

/**
 * What a client may see of a server-side failure: an internal error says nothing but the
 * request id; another 5xx keeps its words unless they carry internals (a database address,
 * a path, an engine message). The full error goes to the log under the same request id.
 */
export function publicError(problem: ReftError, requestId: string): ReftError {
  if (problem.status < 500) return problem;
  if (problem.category !== 'internal' && !INTERNALS.test(problem.message)) {
    return new ReftError(problem.code, `${problem.message} (request ${requestId})`, problem.field, problem.retryAfterSeconds);
  }
  const what =
    problem.category === 'internal'
      ? 'internal server error'
      : problem.category === 'unavailable'
        ? 'a service this server depends on is unavailable'
        : 'the server cannot take this request now';
  return new ReftError(
    problem.code,
    `${what} (request ${requestId}; the server log has the details)`,
    undefined,
    problem.retryAfterSeconds,
  );
}

export function registerProblemHandlers(app: FastifyInstance): void {
  app.setErrorHandler((err, request: FastifyRequest, reply) => {
    const problem = toReftError(err);
    if (problem.status >= 500) {
      const cause = err instanceof Error && err.cause instanceof Error ? err.cause.message : undefined;
      request.log.error({ err, cause, code: problem.code, category: problem.category }, 'request failed');
    } else request.log.info({ code: problem.code, field: problem.field }, problem.message);
    return sendProblem(reply, publicError(problem, request.id), request.url);
  });
  app.setNotFoundHandler((request, reply) =>
    sendProblem(reply, routeNotFound({ method: request.method, path: request.url.split('?')[0] }), request.url),
  );
}
