import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { STORIES } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { BIN, startServerProcess, type ServerProcess } from './support/server.ts';
import { BACKENDS } from './support/databases.ts';

describe.each(BACKENDS)('on %s', (backend) => {
  const ADMIN = 'admin-secret-for-tests-0123456789abcdef';
  let server: ServerProcess;
  let admin: Api;
  let a: Api;
  let b: Api;
  let keyA: { id: string; key: string };
  let ivB: string;

  beforeAll(async () => {
    server = await startServerProcess({
      backend,
      env: { REFT_ADMIN_KEY: ADMIN },
      args: ['--tenant-max-concurrent', '2', '--tenant-max-interventions', '3', '--usage-flush-ms', '100'],
    });
    admin = { url: server.url, key: ADMIN };
    const tenantA = await json(admin, 'POST', '/v1/admin/tenants', { name: 'alpha' });
    const tenantB = await json(admin, 'POST', '/v1/admin/tenants', { name: 'beta' });
    expect(tenantA.status).toBe(201);
    keyA = (await json(admin, 'POST', `/v1/admin/tenants/${tenantA.body.id}/keys`, {})).body;
    const keyB = (await json(admin, 'POST', `/v1/admin/tenants/${tenantB.body.id}/keys`, {})).body;
    expect(keyA.key).toMatch(/^rft_/);
    a = { url: server.url, key: keyA.key };
    b = { url: server.url, key: keyB.key };
    const res = await upload(b, artifact([randomLoreft(7, 3)], { name: 'beta-secret' }));
    expect(res.status).toBe(201);
    ivB = res.body.id;
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  describe('API keys and tenants', () => {
    it('requests without a key or with a wrong one are refused', async () => {
      expect((await json({ url: server.url }, 'GET', '/v1/interventions')).status).toBe(401);
      expect((await json({ url: server.url, key: 'rft_nope' }, 'GET', '/v1/interventions')).status).toBe(401);
      expect((await json(a, 'POST', '/v1/admin/tenants', { name: 'x' })).status).toBe(403);
      expect((await json({ url: server.url }, 'GET', '/healthz')).status).toBe(200);
    });

    it("tenant A can't list, read, download, use or delete tenant B's intervention: it looks missing", async () => {
      const listA = await json(a, 'GET', '/v1/interventions');
      expect(listA.body.data.map((i: { id: string }) => i.id)).not.toContain(ivB);
      const missing = await json(a, 'GET', '/v1/interventions/iv_doesnotexist');
      for (const [method, path] of [
        ['GET', `/v1/interventions/${ivB}`],
        ['GET', '/v1/interventions/beta-secret'],
        ['GET', `/v1/interventions/${ivB}/files/reft_config.json`],
        ['GET', `/v1/interventions/${ivB}/files/reft_weights.safetensors`],
        ['DELETE', `/v1/interventions/${ivB}`],
      ]) {
        const res = await json(a, method, path);
        expect(res.status, `${method} ${path}`).toBe(404);
        expect(res.body.detail.replace(ivB, 'X').replace('beta-secret', 'X')).toBe(missing.body.detail.replace('iv_doesnotexist', 'X'));
      }
      const use = await json(a, 'POST', '/v1/generate', { adapter: ivB, prompt: 'Once upon a time', max_new_tokens: 2 });
      expect(use.status).toBe(404);
      const models = await json(a, 'GET', '/v1/models');
      expect(models.body.data.map((m: { id: string }) => m.id)).not.toContain(ivB);
      // B still has it
      expect((await json(b, 'GET', `/v1/interventions/${ivB}`)).status).toBe(200);
      expect((await json(b, 'POST', '/v1/generate', { adapter: ivB, prompt: 'Once upon a time', max_new_tokens: 2 })).status).toBe(200);
    });

    it('usage belongs to the tenant: each sees its own requests and tokens', async () => {
      const before = (await json(a, 'GET', '/v1/usage')).body.totals;
      for (let i = 0; i < 3; i++)
        expect((await json(a, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 7, ignore_eos: true })).status).toBe(
          200,
        );
      let after = before;
      for (let i = 0; i < 50 && after.requests < before.requests + 3; i++) {
        await new Promise((r) => setTimeout(r, 100));
        after = (await json(a, 'GET', '/v1/usage')).body.totals;
      }
      expect(after.requests - before.requests).toBe(3);
      expect(after.completion_tokens - before.completion_tokens).toBe(21);
      expect(after.prompt_tokens - before.prompt_tokens).toBe(15);
      const usageB = (await json(b, 'GET', '/v1/usage')).body;
      expect(usageB.totals.requests).toBeLessThan(after.requests);
      expect(usageB.data.every((d: { day: string }) => /^\d{4}-\d{2}-\d{2}$/.test(d.day))).toBe(true);
      expect((await json(a, 'GET', '/v1/usage?from=2020-01-02&to=2020-01-01')).status).toBe(400);
      expect((await json(a, 'GET', '/v1/usage?from=2020-01-01&to=2020-01-31')).body.data).toEqual([]);
    });

    it('a revoked key stops working at once', async () => {
      const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name: 'gamma' });
      const key = (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body;
      const c = { url: server.url, key: key.key };
      expect((await json(c, 'GET', '/v1/interventions')).status).toBe(200);
      expect((await json(admin, 'DELETE', `/v1/admin/keys/${key.id}`)).status).toBe(204);
      expect((await json(c, 'GET', '/v1/interventions')).status).toBe(401);
    });

    it('per-tenant limits: a full quota is a 403 quota_exceeded, too many requests at once a 429 with Retry-After', async () => {
      for (let i = 0; i < 2; i++) expect((await upload(a, artifact([randomLoreft(20 + i, 1)], { name: `a-${i}` }))).status).toBe(201);
      expect((await upload(a, artifact([randomLoreft(22, 1)], { name: 'a-2' }))).status).toBe(201);
      const over = await upload(a, artifact([randomLoreft(23, 1)], { name: 'a-3' }));
      expect(over.status).toBe(403);
      expect(over.body).toMatchObject({ code: 'quota_interventions', category: 'quota_exceeded' });
      expect(over.headers.get('retry-after')).toBeNull();
      // concurrency: two streams in flight, the third request is refused
      const controller = new AbortController();
      const streams = [];
      for (let i = 0; i < 2; i++) {
        const res = await fetch(`${a.url}/v1/generate`, {
          method: 'POST',
          headers: { authorization: `Bearer ${a.key}`, 'content-type': 'application/json' },
          body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 500, ignore_eos: true, stream: true }),
          signal: controller.signal,
        });
        await res.body!.getReader().read();
        streams.push(res);
      }
      const third = await json(a, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 1 });
      expect(third.status).toBe(429);
      expect(third.headers.get('retry-after')).toBe('1');
      expect((await json(b, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 1 })).status).toBe(200); // other tenants are unaffected
      controller.abort();
    });
  });
});

describe('binding', () => {
  it('refuses to listen beyond loopback without API keys, and says why', () => {
    const r = spawnSync(
      process.execPath,
      [BIN, 'serve', '--model', STORIES, '--host', '0.0.0.0', '--port', '0', '--data-dir', mkdtempSync(join(tmpdir(), 'reft-bind-'))],
      { encoding: 'utf8', env: { ...process.env, REFT_ADMIN_KEY: '' }, timeout: 30_000 },
    );
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/refusing to listen on 0\.0\.0\.0 without API keys: set REFT_ADMIN_KEY/);
  });
});
