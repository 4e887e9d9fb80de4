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
    for (const path of ['/v1/generate', '/v1/completions', '/v1/chat/completions', '/v1/models', '/v1/interventions', '/v1/interventions/{id}', '/v1/admin/tenants']) {
      expect(doc.paths, path).toHaveProperty([path]);
    }
    expect(doc.paths['/v1/generate'].post.requestBody.content['application/json'].schema.properties).toHaveProperty('adapter');
  });
});
