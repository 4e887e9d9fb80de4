import { createHash } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, fixtureArtifact, randomLoreft } from './support/artifacts.ts';
import { createDatabase, dropDatabase, postgresServer, type PostgresServer } from './support/databases.ts';
import { inferenceCases } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { startServerProcess, startWorkerProcess, type ServerProcess, type WorkerProcess } from './support/server.ts';
import { NEW_SENTENCE, TRAIN_OPENINGS } from './support/training-data.ts';

/**
 * Issue 5: two servers and two workers on one PostgreSQL behave as one; faults (a killed
 * worker, a server killed mid-upload, the database stopped for 10 s) lose nothing and need no
 * restart.
 */
const ADMIN = 'cluster-admin-key-0123456789abcdef0123';
const WORKER_ARGS = ['--lease-ms', '1500', '--checkpoint-ms', '200', '--poll-ms', '200'];
const cases = inferenceCases();

let database: string;
let a: ServerProcess;
let b: ServerProcess;
const workers: WorkerProcess[] = [];
let apiA: Api;
let apiB: Api;

beforeAll(async () => {
  database = await createDatabase();
  // both servers start at once on a fresh database: migrations must not collide
  [a, b] = await Promise.all([
    startServerProcess({ database, env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] }),
    startServerProcess({ database, env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] }),
  ]);
  workers.push(...(await Promise.all([startWorkerProcess(database, WORKER_ARGS), startWorkerProcess(database, WORKER_ARGS)])));
  const tenant = await json({ url: a.url, key: ADMIN }, 'POST', '/v1/admin/tenants', { name: 'acme' });
  const key = await json({ url: b.url, key: ADMIN }, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {});
  apiA = { url: a.url, key: key.body.key };
  apiB = { url: b.url, key: key.body.key };
});

afterAll(async () => {
  await Promise.all([a?.stop(), b?.stop(), ...workers.map((w) => w.stop())]);
  if (database) await dropDatabase(database);
});

const generate = (api: Api, adapter: string, prompt: number[]) =>
  json(api, 'POST', '/v1/generate', { adapter, input_ids: prompt, max_new_tokens: 24, ignore_eos: true });

async function waitForJob(api: Api, id: string, timeoutMs = 120_000): Promise<any> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const job = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
    if (['succeeded', 'failed', 'cancelled'].includes(job.status)) return job;
    if (Date.now() > until) throw new Error(`job ${id} still ${job.status}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const rows = (n: number) => TRAIN_OPENINGS.slice(0, n).map((prompt) => ({ prompt, completion: NEW_SENTENCE }));

describe('two servers and two workers on one PostgreSQL', () => {
  it('an intervention uploaded through A is usable through B on the next request', async () => {
    const c = cases[3];
    const up = await upload(apiA, fixtureArtifact(c), { name: 'shared-style' });
    expect(up.status).toBe(201);
    const viaB = await generate(apiB, 'shared-style', c.prompt);
    expect(viaB.status).toBe(200);
    expect(viaB.body.token_ids).toEqual(c.greedy);
  });

  it('a replacement through A is what B uses next', async () => {
    const c = cases[3];
    const replaced = await upload(apiA, artifact([randomLoreft(77, 3, 4, 'f3+l3', 64, 3)]), { name: 'shared-style', replace: 'true' });
    expect(replaced.body.version).toBe(2);
    const viaA = await generate(apiA, 'shared-style', c.prompt);
    const viaB = await generate(apiB, 'shared-style', c.prompt);
    expect(viaB.body.token_ids).toEqual(viaA.body.token_ids);
    expect(viaB.body.token_ids).not.toEqual(c.greedy);
  });

  it('one deleted through A stops working on B within 1 s', async () => {
    const c = cases[1];
    const up = await upload(apiA, fixtureArtifact(c), { name: 'short-lived' });
    expect((await generate(apiB, up.body.id, c.prompt)).status).toBe(200);
    expect((await json(apiA, 'DELETE', `/v1/interventions/${up.body.id}`)).status).toBe(204);
    const deletedAt = Date.now();
    let status = 200;
    while (status === 200 && Date.now() - deletedAt < 1000) status = (await generate(apiB, up.body.id, c.prompt)).status;
    expect(status).toBe(404);
    expect(Date.now() - deletedAt).toBeLessThan(1000);
  });

  it('every job runs to success exactly once', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) {
      const api = i % 2 ? apiB : apiA;
      const res = await json(api, 'POST', '/v1/training/jobs', {
        data: rows(4),
        intervention: { rank: 2 },
        hyperparameters: { epochs: 10, seed: i },
        name: `once-${i}`,
      });
      expect(res.status).toBe(202);
      ids.push(res.body.id);
    }
    const jobs = await Promise.all(ids.map((id) => waitForJob(apiA, id)));
    for (const job of jobs) {
      expect(job.status).toBe('succeeded');
      expect(job.attempts).toBe(1);
      const events = (await json(apiB, 'GET', `/v1/training/jobs/${job.id}/events?limit=1000`)).body.data;
      expect(events.filter((e: any) => e.type === 'status' && e.data?.status === 'running')).toHaveLength(1);
      expect(events.filter((e: any) => e.type === 'status' && e.data?.status === 'succeeded')).toHaveLength(1);
    }
    const names = (await json(apiB, 'GET', '/v1/interventions?limit=100')).body.data
      .filter((iv: any) => iv.source === 'training')
      .map((iv: any) => iv.name)
      .sort();
    expect(names).toEqual(['once-0', 'once-1', 'once-2', 'once-3', 'once-4', 'once-5']);
    // both workers took part
    const claimedBy = workers.map((w) => w.logs.filter((l) => l.msg === 'job started' || l.msg === 'job resumed from checkpoint').length);
    expect(
      claimedBy.every((n) => n > 0),
      JSON.stringify(claimedBy),
    ).toBe(true);
  });

  it('kill -9 of a worker mid-job: the other worker finishes the job from its checkpoint', async () => {
    const res = await json(apiA, 'POST', '/v1/training/jobs', { data: rows(20), hyperparameters: { epochs: 120, seed: 3 }, name: 'relay' });
    const id = res.body.id;
    let holder: WorkerProcess | undefined;
    for (;;) {
      holder = workers.find((w) => w.logs.some((l) => l.job === id && l.msg === 'job started'));
      const job = (await json(apiA, 'GET', `/v1/training/jobs/${id}`)).body;
      if (holder && (job.progress?.step ?? 0) > 300) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await holder.stop('SIGKILL');
    const other = workers.find((w) => w !== holder)!;
    const job = await waitForJob(apiB, id);
    expect(job.status).toBe('succeeded');
    expect(job.attempts).toBe(2);
    const resumed = other.logs.find((l) => l.job === id && l.msg === 'job resumed from checkpoint');
    expect(resumed).toBeTruthy();
    expect(Number(resumed!.resumedAt)).toBeGreaterThan(0);
    workers.splice(workers.indexOf(holder), 1, await startWorkerProcess(database, WORKER_ARGS));
  });
});

describe('faults', () => {
  it('a server killed in the middle of uploads: nothing partial is ever visible', async () => {
    const victim = await startServerProcess({ database, env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] });
    const victimApi = { url: victim.url, key: apiA.key };
    const sent = new Map<string, string>();
    const uploads: Promise<unknown>[] = [];
    for (let i = 0; i < 12; i++) {
      const files = artifact(
        Array.from({ length: 5 }, (_, l) => randomLoreft(300 + 10 * i + l, l, 16)),
        { name: `mid-${i}` },
      );
      sent.set(`mid-${i}`, createHash('sha256').update(files.config).update(files.weights).digest('hex'));
      uploads.push(upload(victimApi, files).catch(() => null));
    }
    // and one upload whose body is still arriving when the server dies
    const slow = slowUpload(victim.url, apiA.key!, artifact([randomLoreft(999, 2)], { name: 'mid-slow' }));
    await new Promise((r) => setTimeout(r, 60));
    await victim.stop('SIGKILL');
    await Promise.all([...uploads, slow]);
    const visible = (await json(apiB, 'GET', '/v1/interventions?limit=100')).body.data.filter((iv: any) => iv.name.startsWith('mid-'));
    expect(visible.map((iv: any) => iv.name)).not.toContain('mid-slow');
    for (const iv of visible) {
      const config = Buffer.from(
        await (
          await fetch(`${apiB.url}/v1/interventions/${iv.id}/files/reft_config.json`, { headers: { authorization: `Bearer ${apiB.key}` } })
        ).arrayBuffer(),
      );
      const weights = Buffer.from(
        await (
          await fetch(`${apiB.url}/v1/interventions/${iv.id}/files/reft_weights.safetensors`, {
            headers: { authorization: `Bearer ${apiB.key}` },
          })
        ).arrayBuffer(),
      );
      expect(createHash('sha256').update(config).update(weights).digest('hex'), iv.name).toBe(sent.get(iv.name));
      expect(iv.sha256).toBe(sent.get(iv.name));
    }
  });

  it('PostgreSQL stopped for 10 s: running generations finish, new requests get 503 with Retry-After, then everything recovers', async () => {
    const c = cases[3];
    const up = await upload(apiA, fixtureArtifact(c), { name: 'outage' });
    expect(up.status).toBe(201);
    const server: PostgresServer = await postgresServer();
    const controller = new AbortController();
    const running = fetch(`${apiB.url}/v1/generate`, {
      method: 'POST',
      headers: { authorization: `Bearer ${apiB.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ adapter: 'outage', input_ids: c.prompt, max_new_tokens: 480, ignore_eos: true, stream: true }),
      signal: controller.signal,
    });
    const reader = (await running).body!.getReader();
    await reader.read(); // generating
    let stoppedAt = 0;
    try {
      await server.stop();
      stoppedAt = Date.now();
      let text = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += new TextDecoder().decode(value);
      }
      const done = JSON.parse(
        text
          .split('\n\n')
          .filter((f) => f.startsWith('data: '))
          .at(-1)!
          .slice(6),
      );
      expect(done.type).toBe('done');
      expect(done.usage.completion_tokens).toBe(480);
      for (const api of [apiA, apiB]) {
        const refused = await generate(api, 'outage', c.prompt);
        expect(refused.status).toBe(503);
        expect(Number(refused.headers.get('retry-after'))).toBeGreaterThan(0);
        expect(refused.body).toMatchObject({ code: 'database_unavailable', category: 'unavailable' });
      }
      await new Promise((r) => setTimeout(r, Math.max(0, 10_000 - (Date.now() - stoppedAt))));
    } finally {
      await server.restore();
    }
    for (const api of [apiA, apiB]) {
      let res = await generate(api, 'outage', c.prompt);
      for (let i = 0; i < 50 && res.status !== 200; i++) {
        await new Promise((r) => setTimeout(r, 200));
        res = await generate(api, 'outage', c.prompt);
      }
      expect(res.status).toBe(200);
      expect(res.body.token_ids).toEqual(c.greedy);
    }
    // the workers reconnect too: a job queued now runs
    const job = await json(apiA, 'POST', '/v1/training/jobs', { data: rows(2), intervention: { rank: 1 }, hyperparameters: { epochs: 2 } });
    expect((await waitForJob(apiB, job.body.id)).status).toBe('succeeded');
  });
});

/** Sends a multipart upload whose body trickles in, so the server dies while receiving it. */
function slowUpload(url: string, key: string, files: { config: string; weights: Uint8Array }): Promise<void> {
  return new Promise((resolve) => {
    const boundary = 'slow-boundary';
    const head = Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="config"; filename="reft_config.json"\r\n\r\n${files.config}\r\n` +
        `--${boundary}\r\nContent-Disposition: form-data; name="weights"; filename="reft_weights.safetensors"\r\n\r\n`,
    );
    const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
    const body = Buffer.concat([head, Buffer.from(files.weights), tail]);
    const u = new URL(url);
    const req = httpRequest({
      host: u.hostname,
      port: u.port,
      method: 'POST',
      path: '/v1/interventions',
      headers: {
        authorization: `Bearer ${key}`,
        'content-type': `multipart/form-data; boundary=${boundary}`,
        'content-length': body.length,
      },
    });
    req.on('error', () => resolve());
    req.on('response', (res) => {
      res.resume();
      res.on('end', () => resolve());
    });
    let at = 0;
    const timer = setInterval(() => {
      if (at >= body.length - 10) return clearInterval(timer); // never quite finishes
      req.write(body.subarray(at, at + 64));
      at += 64;
    }, 10);
    req.on('close', () => clearInterval(timer));
  });
}
