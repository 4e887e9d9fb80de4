import { readFileSync, readdirSync } from 'node:fs';
import { STATUS_CODES } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AREAS, CATEGORY_STATUS, ReftError, catalogue, declarationOf, type ErrorDeclaration } from '../src/errors.ts';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { json, upload, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

const ROOT = join(import.meta.dirname, '..');
const entries = catalogue();
/** The specific entries, by area (the generic ones, one per category, are the rest). */
const specific = Object.entries(AREAS).flatMap(([area, mod]) =>
  Object.entries(mod as Record<string, unknown>).flatMap(([name, d]) =>
    typeof d === 'function' && typeof (d as { code?: unknown }).code === 'string'
      ? [{ area, name, d: d as unknown as ErrorDeclaration }]
      : [],
  ),
);

describe('the error catalogue', () => {
  it('declares each code once, in snake_case, every specific entry in an area and every category as a generic entry', () => {
    const codes = entries.map((e) => e.code);
    expect(new Set(codes).size).toBe(codes.length);
    for (const code of codes) expect(code).toMatch(/^[a-z][a-z0-9]*(_[a-z0-9]+)*$/);
    expect(specific.length).toBeGreaterThan(100);
    expect(new Set(specific.map((s) => s.d.code)).size).toBe(specific.length);
    const generic = codes.filter((c) => !specific.some((s) => s.d.code === c));
    expect(generic.sort()).toEqual(Object.keys(CATEGORY_STATUS).sort());
    for (const area of Object.keys(AREAS))
      expect(
        specific.some((s) => s.area === area),
        area,
      ).toBe(true);
  });

  it("gives every entry a real HTTP error status, its category's, a title and a type that names it", () => {
    for (const e of entries) {
      expect(e.status, e.code).toBeGreaterThanOrEqual(400);
      expect(e.status, e.code).toBeLessThan(600);
      expect(STATUS_CODES[e.status], e.code).toBeDefined();
      expect(e.status, e.code).toBe(CATEGORY_STATUS[e.category]);
      expect(e.title, e.code).toMatch(/^[A-Z]/);
      expect(e.type, e.code).toBe(`/problems/${e.code}`);
      expect(declarationOf(e.code)).toBe(e);
    }
  });

  it('builds errors that carry their entry: code, category, status, field, Retry-After, and survive a thread hop', () => {
    // every template reads its parameters by name; this stands in for any of them
    const anything = new Proxy({}, { get: () => ['x'] });
    for (const { d } of specific) {
      const build = d as unknown as (...args: unknown[]) => ReftError;
      const takesParams = (d as unknown as { message: (p: unknown) => string }).message.length > 0;
      const options = { retryAfterSeconds: 3 };
      const err = takesParams ? build(anything, 'some.field', options) : build('some.field', options);
      expect(err).toBeInstanceOf(ReftError);
      expect(err).toMatchObject({
        code: d.code,
        category: d.category,
        status: d.status,
        type: d.type,
        field: 'some.field',
        retryAfterSeconds: 3,
      });
      expect(err.message, d.code).toMatch(/\S/);
      expect(err.message, d.code).not.toContain('undefined');
      expect(ReftError.fromJSON(structuredClone(err.toJSON()))).toMatchObject({ code: d.code, category: d.category, field: 'some.field' });
    }
  });

  it('keeps the old constructor and factories: a category builds its generic entry; an unknown code is internal', () => {
    expect(new ReftError('not_found', 'gone', 'id')).toMatchObject({ code: 'not_found', category: 'not_found', status: 404, field: 'id' });
    expect(new ReftError('quota_exceeded', 'full')).toMatchObject({ code: 'quota_exceeded', status: 403 });
    expect(ReftError.fromJSON({ code: 'from_a_newer_worker' as never, message: 'x' })).toMatchObject({ code: 'internal', status: 500 });
  });

  it('is documented: the README explains code, category and type; the OpenAPI Problem schema enumerates every code', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    for (const word of ['`code`', '`category`', '/problems/{code}']) expect(readme).toContain(word);
    const doc = JSON.parse(readFileSync(join(ROOT, 'openapi', 'openapi.json'), 'utf8'));
    const problem = doc.components.schemas.Problem;
    expect(problem.properties.code.enum.sort()).toEqual(entries.map((e) => e.code).sort());
    expect(problem.properties.category.enum.sort()).toEqual([...new Set(entries.map((e) => e.category))].sort());
  });

  it('is the only source of error codes: no route or module builds a ReftError from a bare category', () => {
    const legacy =
      /new ReftError\('|\b(invalidRequest|invalidIntervention|invalidCheckpoint|unsupportedModel|notFound|noSuch|quotaExceeded)\(/;
    const offenders: string[] = [];
    for (const file of readdirSync(join(ROOT, 'src'), { recursive: true }) as string[]) {
      if (!file.endsWith('.ts') || file === 'errors.ts' || file.startsWith('errors/')) continue;
      readFileSync(join(ROOT, 'src', file), 'utf8')
        .split('\n')
        .forEach((line) => {
          if (legacy.test(line) && !/^\s*(\/\/|\*|export const quotaExceeded)/.test(line)) offenders.push(`${file}: ${line.trim()}`);
        });
    }
    // the two fallbacks of the HTTP edge: a 404 fastify raised itself, and a failure that isn't ours
    expect(offenders).toEqual([
      "server/problem.ts: if (e.statusCode === 404) return new ReftError('not_found', e.message);",
      "server/problem.ts: return new ReftError('internal', 'internal server error');",
    ]);
  });
});

describe('errors over HTTP carry their catalogue entry', () => {
  let server: ServerProcess;
  let api: Api;
  beforeAll(async () => {
    server = await startServerProcess({ args: ['--no-worker'] });
    api = { url: server.url };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  /** The body's code, status, type, title and category are the declaration's; its type resolves to the entry. */
  async function expectEntry(res: { status: number; body: any; headers: Headers }, code: string) {
    const d = declarationOf(code)!;
    expect(res.status, JSON.stringify(res.body)).toBe(d.status);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(res.body).toMatchObject({ code, status: d.status, type: d.type, title: d.title, category: d.category });
    const page = await fetch(new URL(res.body.type, `${server.url}/v1/anything`));
    expect(page.status).toBe(200);
    expect(await page.json()).toMatchObject({ code, status: d.status, category: d.category, title: d.title, type: d.type });
  }

  it('a refusal of each kind: route, body, lookup, media type, multipart, artifact, OpenAI parameter', async () => {
    await expectEntry(await json(api, 'GET', '/v1/nothing-here'), 'route_not_found');
    await expectEntry(await json(api, 'POST', '/v1/generate', { prompt: 'x', temprature: 1 }), 'body_invalid');
    await expectEntry(await json(api, 'POST', '/v1/generate', { adapter: 'nope', prompt: 'x' }), 'intervention_not_found');
    await expectEntry(await json(api, 'POST', '/v1/interventions', { config: 1 }), 'multipart_expected');
    await expectEntry(await upload(api, artifact([randomLoreft(1, 9)])), 'intervention_layer_out_of_range');
    await expectEntry(await json(api, 'GET', '/v1/training/jobs/job_0123456789abcdef01234567'), 'job_not_found');
    const openai = await json(api, 'POST', '/v1/completions', { model: 'stories260k', prompt: 'x', suffix: 'y' });
    expect(openai.status).toBe(declarationOf('parameter_unsupported')!.status);
    expect(openai.body.error).toMatchObject({ code: 'parameter_unsupported', param: 'suffix', type: 'invalid_request_error' });
  });

  it('GET /problems lists every entry with its area; an unknown code is its own 404', async () => {
    const list = await json(api, 'GET', '/problems');
    expect(list.status).toBe(200);
    expect(list.body.map((e: { code: string }) => e.code).sort()).toEqual(entries.map((e) => e.code).sort());
    for (const e of list.body) expect(e.area, e.code).toBe(specific.find((s) => s.d.code === e.code)?.area ?? 'generic');
    await expectEntry(await json(api, 'GET', '/problems/no_such_code'), 'problem_type_not_found');
  });
});
