import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { json, type Api } from './support/http.ts';
import { BACKENDS, createDatabase, dropDatabase } from './support/databases.ts';
import { startServerProcess, startWorkerProcess } from './support/server.ts';

/**
 * Issue 11, finding 8, as its done-when says: with one tenant's 20 jobs queued, another tenant's
 * job starts next. The jobs are queued on a server without a worker; a worker process is then
 * started on the same store, and the order of its claims is read from the jobs' start times.
 * The jobs are one-step: what matters is which is claimed when.
 */
const ADMIN = 'admin-secret-for-tests-0123456789abcdef';
const JOB = {
  data: [{ prompt: 'Once upon a time', completion: ' there was a frog.' }],
  intervention: { kind: 'loreft', rank: 1, layers: [0], positions: 'l1' },
  hyperparameters: { epochs: 1, batch_size: 1 },
};

interface Job {
  id: string;
  status: string;
  started_at: string | null;
}

describe.each(BACKENDS)('on %s', (backend) => {
  let database: string | undefined;
  afterAll(async () => {
    if (database) await dropDatabase(database);
  });

  // two processes start and train two one-step jobs: slow on a loaded machine
  it("with one tenant's 20 jobs queued, another tenant's job starts next", { timeout: 180_000 }, async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'reft-fair-jobs-'));
    database = backend === 'postgres' ? await createDatabase() : undefined;

    const server = await startServerProcess({ dataDir, database, env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] });
    const admin = { url: server.url, key: ADMIN };
    const apiOf = async (name: string): Promise<Api> => {
      const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name });
      expect(tenant.status).toBe(201);
      return { url: server.url, key: (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body.key };
    };
    const [a, b] = [await apiOf('busy'), await apiOf('patient')];
    const create = async (api: Api) => {
      const res = await json(api, 'POST', '/v1/training/jobs', JOB);
      expect(res.status).toBe(202);
      return res.body.id as string;
    };
    const many: string[] = [];
    for (let i = 0; i < 20; i++) many.push(await create(a));
    const one = await create(b);

    const worker = await startWorkerProcess(database, ['--poll-ms', '100'], dataDir);
    try {
      let other: Job;
      for (;;) {
        other = (await json(b, 'GET', `/v1/training/jobs/${one}`)).body;
        if (other.status === 'succeeded') break;
        expect(other.status).toMatch(/queued|running/);
        await new Promise((r) => setTimeout(r, 100));
      }
      const jobsOfA: Job[] = await Promise.all(many.map(async (id) => (await json(a, 'GET', `/v1/training/jobs/${id}`)).body));
      const startedBefore = jobsOfA.filter((j) => j.started_at !== null && Date.parse(j.started_at) <= Date.parse(other.started_at!));
      // tenants tie on the first claim (neither served yet): the oldest job, A's first, goes first;
      // then B's one job, ahead of A's 19 older ones
      expect(startedBefore.map((j) => j.id)).toEqual([many[0]]);
      expect(jobsOfA[0].status).toBe('succeeded');
    } finally {
      expect(await worker.stop()).toBe(0);
      expect(await server.stop()).toBe(0);
    }
  });
});
