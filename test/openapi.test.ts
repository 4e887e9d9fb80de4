import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateOpenapi } from '../src/cli/openapi.ts';

describe('openapi/openapi.json', () => {
  it('is the document the route schemas generate (run `npm run openapi` after changing a route)', async () => {
    const committed = readFileSync(join(import.meta.dirname, '..', 'openapi', 'openapi.json'), 'utf8');
    const generated = await generateOpenapi();
    expect(committed).toBe(generated);
    const doc = JSON.parse(generated);
    for (const path of [
      '/v1/generate',
      '/v1/completions',
      '/v1/chat/completions',
      '/v1/models',
      '/v1/interventions',
      '/v1/interventions/{id}',
      '/v1/admin/tenants',
    ]) {
      expect(doc.paths, path).toHaveProperty([path]);
    }
    expect(doc.paths['/v1/generate'].post.requestBody.content['application/json'].schema.properties).toHaveProperty('adapter');
  });
});

describe('the OpenAPI document, read without Swagger', () => {
  const doc = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'openapi', 'openapi.json'), 'utf8'));
  const operations = Object.entries(doc.paths as Record<string, Record<string, any>>).flatMap(([path, ops]) =>
    Object.entries(ops).map(([method, op]) => ({ key: `${method.toUpperCase()} ${path}`, path, op })),
  );
  const openai = (path: string) =>
    ['/v1/completions', '/v1/chat/completions', '/tokenize', '/detokenize'].includes(path) || path.startsWith('/v1/models');

  it('upload routes describe their multipart parts, files as binary', () => {
    for (const [key, files] of [
      ['POST /v1/interventions', ['config', 'weights']],
      ['POST /v1/interventions/import/pyreft', ['config']],
      ['POST /v1/files', ['file']],
    ] as const) {
      const schema = operations.find((o) => o.key === key)!.op.requestBody.content['multipart/form-data'].schema;
      for (const f of files) expect(schema.properties[f], `${key} ${f}`).toMatchObject({ type: 'string', format: 'binary' });
      expect(schema.required, key).toEqual(expect.arrayContaining([...files]));
    }
  });

  it('every JSON body has an example, every path parameter an example, every response a real description', () => {
    for (const { key, op } of operations) {
      const body = op.requestBody?.content?.['application/json'];
      if (body) expect(body.example, key).toBeDefined();
      for (const p of op.parameters ?? []) if (p.in === 'path') expect(p.example, `${key} ${p.name}`).toBeDefined();
      for (const [status, r] of Object.entries(op.responses ?? {}) as Array<[string, any]>)
        expect(r.description, `${key} ${status}`).not.toBe('Default Response');
    }
    expect(operations.find((o) => o.key === 'GET /v1/training/jobs/{id}')!.op.parameters.find((p: any) => p.name === 'id').example).toMatch(
      /^job_[0-9a-f]{24}$/,
    );
  });

  it("errors are problem+json, or OpenAI's error object on the OpenAI routes", () => {
    for (const { key, path, op } of operations) {
      const error = op.responses?.['4XX'];
      if (!error) continue;
      if (openai(path)) {
        expect(Object.keys(error.content), key).toEqual(['application/json']);
        expect(error.content['application/json'].schema.properties.error.required, key).toEqual(['message', 'type', 'param', 'code']);
      } else {
        expect(Object.keys(error.content), key).toEqual(['application/problem+json']);
      }
    }
  });

  it('streaming routes offer text/event-stream; routes that need no key have no lock', () => {
    for (const key of ['POST /v1/generate', 'POST /v1/completions', 'POST /v1/chat/completions', 'GET /v1/training/jobs/{id}/events']) {
      const ok = operations.find((o) => o.key === key)!.op.responses['200'];
      expect(Object.keys(ok.content), key).toContain('text/event-stream');
    }
    for (const { key, op } of operations) {
      const open = ['GET /healthz', 'GET /readyz', 'GET /metrics', 'GET /problems', 'GET /problems/{code}'].includes(key);
      expect(op.security, key).toEqual(open ? [] : undefined);
    }
    expect(doc.security).toEqual([{ bearer: [] }]);
    expect(doc.paths).toHaveProperty(['/v1/models/{model}']);
  });
});
