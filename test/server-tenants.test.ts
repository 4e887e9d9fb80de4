import { mkdtempSync, readdirSync } from 'node:fs';
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
      args: ['--tenant-max-concurrent', '2', '--tenant-max-queued', '0', '--tenant-max-interventions', '3', '--usage-flush-ms', '100'],
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

    it('the admin gets, renames (names unique: 409), lists keys without secrets, reads usage and deletes a tenant', async () => {
      const made = await json(admin, 'POST', '/v1/admin/tenants', { name: 'delta' });
      expect(made.status).toBe(201);
      const id = made.body.id;
      const dup = await json(admin, 'POST', '/v1/admin/tenants', { name: 'delta' });
      expect([dup.status, dup.body.code, dup.body.field]).toEqual([409, 'tenant_name_taken', 'name']);
      expect((await json(admin, 'GET', `/v1/admin/tenants/${id}`)).body).toEqual(made.body);
      expect((await json(admin, 'GET', `/v1/admin/tenants/ten_${'0'.repeat(24)}`)).status).toBe(404);
      expect((await json(a, 'GET', `/v1/admin/tenants/${id}`)).status).toBe(403);
      const taken = await json(admin, 'PATCH', `/v1/admin/tenants/${id}`, { name: 'alpha' });
      expect([taken.status, taken.body.code, taken.body.field]).toEqual([409, 'tenant_name_taken', 'name']);
      const renamed = await json(admin, 'PATCH', `/v1/admin/tenants/${id}`, { name: 'delta-2' });
      expect([renamed.status, renamed.body]).toEqual([200, { ...made.body, name: 'delta-2' }]);

      const used = (await json(admin, 'POST', `/v1/admin/tenants/${id}/keys`, {})).body;
      const idle = (await json(admin, 'POST', `/v1/admin/tenants/${id}/keys`, {})).body;
      expect(used.prefix).toBe(used.key.slice(0, 12));
      const d = { url: server.url, key: used.key };
      const iv = await upload(d, artifact([randomLoreft(31, 2)], { name: 'delta-iv' }));
      expect(iv.status).toBe(201);
      const form = new FormData();
      form.append('file', new Blob(['{"prompt": "Once upon a time", "completion": " a frog sang."}\n']), 'data.jsonl');
      const file = await fetch(`${server.url}/v1/files`, { method: 'POST', headers: { authorization: `Bearer ${used.key}` }, body: form });
      expect(file.status).toBe(201);
      const fileId = ((await file.json()) as { id: string }).id;
      expect((await json(d, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3, ignore_eos: true })).status).toBe(200);

      let keys = await json(admin, 'GET', `/v1/admin/tenants/${id}/keys`);
      for (let i = 0; i < 50 && keys.body.data.find((k: any) => k.id === used.id).last_used_at === null; i++) {
        await new Promise((r) => setTimeout(r, 100)); // the last use is written after the request, not during it
        keys = await json(admin, 'GET', `/v1/admin/tenants/${id}/keys`);
      }
      keys.body.data.sort((x: any, y: any) => Number(y.id === used.id) - Number(x.id === used.id)); // two keys made in one millisecond come in either order
      expect(keys.body.data.map((k: any) => [k.id, k.prefix, k.tenant_id, k.revoked_at])).toEqual([
        [used.id, used.prefix, id, null],
        [idle.id, idle.prefix, id, null],
      ]);
      expect(Date.parse(keys.body.data[0].last_used_at)).toBeGreaterThanOrEqual(Date.parse(used.created_at));
      expect(keys.body.data[1].last_used_at).toBeNull();
      expect(JSON.stringify(keys.body)).not.toContain(used.key);
      expect(JSON.stringify(keys.body)).not.toContain(idle.key);

      let usage = await json(admin, 'GET', `/v1/admin/tenants/${id}/usage`);
      for (let i = 0; i < 50 && usage.body.totals.requests === 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        usage = await json(admin, 'GET', `/v1/admin/tenants/${id}/usage`);
      }
      expect(usage.body.totals).toMatchObject({ requests: 1, completion_tokens: 3 });
      expect(usage.body).toEqual((await json(d, 'GET', '/v1/usage')).body);
      const blobs = () => (backend === 'sqlite' ? readdirSync(join(server.dataDir, 'blobs')) : []);
      if (backend === 'sqlite') expect(blobs().filter((n) => n.startsWith(iv.body.id) || n.startsWith(fileId))).toHaveLength(3);

      expect((await json(admin, 'DELETE', `/v1/admin/tenants/${id}`)).status).toBe(204);
      expect((await json(d, 'GET', '/v1/interventions')).status).toBe(401);
      expect((await json({ url: server.url, key: idle.key }, 'GET', '/v1/usage')).status).toBe(401);
      expect((await json(admin, 'GET', `/v1/admin/tenants/${id}`)).status).toBe(404);
      expect((await json(admin, 'GET', `/v1/admin/tenants/${id}/keys`)).status).toBe(404);
      expect((await json(admin, 'GET', `/v1/admin/tenants/${id}/usage`)).status).toBe(404);
      expect((await json(admin, 'DELETE', `/v1/admin/tenants/${id}`)).status).toBe(404);
      const listed = await json(admin, 'GET', '/v1/admin/tenants?limit=100');
      expect(listed.body.data.map((t: { id: string }) => t.id)).not.toContain(id);
      expect(blobs().filter((n) => n.startsWith(iv.body.id) || n.startsWith(fileId))).toEqual([]);
      // its name is free again, and the new tenant starts empty
      const again = await json(admin, 'POST', '/v1/admin/tenants', { name: 'delta-2' });
      expect(again.status).toBe(201);
      const fresh = { url: server.url, key: (await json(admin, 'POST', `/v1/admin/tenants/${again.body.id}/keys`, {})).body.key };
      expect((await json(fresh, 'GET', '/v1/interventions')).body.data.map((i: any) => i.name)).not.toContain('delta-iv');
      expect((await json(fresh, 'GET', '/v1/usage')).body.totals.requests).toBe(0);
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
