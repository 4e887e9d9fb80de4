import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { json, upload, type Api } from './support/http.ts';
import { stillGenerates } from './support/probe.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

// Quotas hold until something is deleted or finishes: a 403 quota_exceeded without Retry-After
// (a 429 would make clients retry in vain). No worker runs, so jobs stay queued.

const ROWS = Array.from({ length: 20 }, (_, i) => ({ prompt: `Once upon a time ${i}`, completion: ' there was a frog.' }));
const JOB = {
  data: ROWS.slice(0, 2),
  intervention: { kind: 'loreft', rank: 2, layers: [1], positions: 'l1' },
  hyperparameters: { epochs: 1 },
};

function expectQuota(res: { status: number; body: any; headers: Headers }, field: string, code: string): void {
  expect(res.status).toBe(403);
  expect(res.body).toMatchObject({ code, category: 'quota_exceeded', field });
  expect(res.headers.get('retry-after')).toBeNull();
}

describe('training files and jobs against per-tenant quotas', () => {
  let server: ServerProcess;
  let api: Api;
  beforeAll(async () => {
    server = await startServerProcess({ args: ['--no-worker', '--tenant-max-file-bytes', '2000', '--tenant-max-jobs', '1'] });
    api = { url: server.url };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  async function uploadFile(text: string) {
    const form = new FormData();
    form.append('file', new Blob([text]), 'data.jsonl');
    form.append('purpose', 'fine-tune');
    const res = await fetch(`${api.url}/v1/files`, { method: 'POST', body: form });
    return { status: res.status, body: (await res.json()) as any, headers: res.headers };
  }

  it('training files count against the tenant byte quota; deleting one makes room', async () => {
    const text = ROWS.map((r) => JSON.stringify(r)).join('\n');
    expect(text.length).toBeGreaterThan(1000);
    const first = await uploadFile(text);
    expect(first.status).toBe(201);
    expectQuota(await uploadFile(text), 'file', 'quota_file_bytes');
    expect((await json(api, 'DELETE', `/v1/files/${first.body.id}`)).status).toBe(204);
    expect((await uploadFile(text)).status).toBe(201);
    await stillGenerates(api);
  });

  it('at most --tenant-max-jobs training jobs queued or running; a cancelled one frees its place', async () => {
    const job = await json(api, 'POST', '/v1/training/jobs', JOB);
    expect(job.status).toBe(202);
    expectQuota(await json(api, 'POST', '/v1/training/jobs', JOB), 'training_file', 'quota_active_jobs');
    expect((await json(api, 'POST', `/v1/training/jobs/${job.body.id}/cancel`)).status).toBe(200);
    expect((await json(api, 'POST', '/v1/training/jobs', JOB)).status).toBe(202);
    await stillGenerates(api);
  });
});

describe('training against the intervention quota', () => {
  let server: ServerProcess;
  let api: Api;
  beforeAll(async () => {
    server = await startServerProcess({ args: ['--no-worker', '--tenant-max-interventions', '2'] });
    api = { url: server.url };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  it('an unfinished job holds a place: it is refused when stored plus unfinished reach the quota, as is the upload past it', async () => {
    expect((await upload(api, artifact([randomLoreft(1, 1)], { name: 'one' }))).status).toBe(201);
    expect((await json(api, 'POST', '/v1/training/jobs', JOB)).status).toBe(202);
    expectQuota(await json(api, 'POST', '/v1/training/jobs', JOB), 'name', 'quota_interventions');
    expect((await upload(api, artifact([randomLoreft(2, 1)], { name: 'two' }))).status).toBe(201);
    expectQuota(await upload(api, artifact([randomLoreft(3, 1)], { name: 'three' })), 'weights', 'quota_interventions');
    await stillGenerates(api);
  });
});
