import { getPriority } from 'node:os';
import { WORKER_NICENESS } from '../src/jobs/supervisor.ts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../src/model/load.ts';
import { tokenizeRows } from '../src/training/data.ts';
import { stepBytes } from '../src/training/memory.ts';
import { STORIES } from './support/fixtures.ts';
import { json, type Api } from './support/http.ts';
import { expectHealthzResponsive, rssMb, stillGenerates, whileProbing } from './support/probe.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * Issue 11, findings 3, 5 and 9, scaled down: a worker tokenizing a large job keeps its lease
 * (heartbeats are not blocked) and stops within a few seconds of SIGTERM, handing the job back;
 * a batch far over the training memory budget trains in micro-batches within it.
 */
let server: ServerProcess;
let api: Api;

beforeAll(async () => {
  // a short lease: a worker whose heartbeats stalled while tokenizing would lose the job
  server = await startServerProcess({ args: ['--lease-ms', '1500', '--poll-ms', '100', '--max-training-chars', '2000000'] });
  api = { url: server.url };
});
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function until<T>(what: string, probe: () => Promise<T | null | undefined | false>, timeoutMs = 120_000): Promise<T> {
  const t = Date.now();
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() - t > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** ~ 200 k characters: several seconds of tokenizing (the JS tokenizer costs tens of µs a character). */
const bigRows = Array.from({ length: 200 }, (_, i) => ({
  prompt: `Story ${i}: once upon a time`,
  completion: ' there was a little cat who liked to play in the sun.'.repeat(18),
}));

describe('a worker tokenizing a large job', () => {
  it('keeps its lease while tokenizing (heartbeats run), then trains as attempt 1', async () => {
    const created = await json(api, 'POST', '/v1/training/jobs', { data: bigRows, hyperparameters: { max_steps: 2, batch_size: 1 } });
    expect(created.status, JSON.stringify(created.body)).toBe(202);
    const id = created.body.id;
    const done = await until('the job to end', async () => {
      const j = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
      return ['succeeded', 'failed', 'cancelled'].includes(j.status) && j;
    });
    expect(done.status, JSON.stringify(done)).toBe('succeeded');
    expect(done.attempts).toBe(1); // never reclaimed: the lease (1.5 s) survived seconds of tokenizing
  });

  it('stops within 4 s of SIGTERM while tokenizing, and the job is handed back', async () => {
    const created = await json(api, 'POST', '/v1/training/jobs', { data: bigRows, hyperparameters: { max_steps: 2, batch_size: 1 } });
    const id = created.body.id;
    await until('the job to be claimed', async () => (await json(api, 'GET', `/v1/training/jobs/${id}`)).body.status === 'running');
    const events = (await json(api, 'GET', `/v1/training/jobs/${id}/events`)).body.data;
    expect(events.filter((e: any) => e.type === 'log')).toEqual([]); // still tokenizing: no "training N steps" yet
    const pid = Number(server.logs.filter((l) => l.msg === 'training worker started').at(-1)!.pid);
    process.kill(pid, 'SIGTERM');
    const t = Date.now();
    while (alive(pid) && Date.now() - t < 4000) await new Promise((r) => setTimeout(r, 20));
    expect(alive(pid), `worker still running ${Date.now() - t} ms after SIGTERM`).toBe(false);
    expect(server.logs.some((l) => l.msg === 'worker stopping' && l.why === 'SIGTERM')).toBe(true);
    // the restarted worker takes it up again and finishes it
    const done = await until('the job to end', async () => {
      const j = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
      return ['succeeded', 'failed', 'cancelled'].includes(j.status) && j;
    });
    expect(done.status, JSON.stringify(done)).toBe('succeeded');
  });
});

describe('finding 11: live training event streams', () => {
  it('are capped per tenant: the ninth is a 429 before any event is sent', async () => {
    const created = await json(api, 'POST', '/v1/training/jobs', {
      data: [{ prompt: 'Once upon a time', completion: ' there was a cat.' }],
      hyperparameters: { max_steps: 100_000, batch_size: 1 },
    });
    const id = created.body.id;
    const controller = new AbortController();
    const open: Response[] = [];
    for (let i = 0; i < 8; i++) {
      const res = await fetch(`${api.url}/v1/training/jobs/${id}/events?stream=true`, { signal: controller.signal });
      expect(res.status).toBe(200);
      open.push(res);
    }
    const ninth = await fetch(`${api.url}/v1/training/jobs/${id}/events?stream=true`);
    expect(ninth.status).toBe(429);
    expect(ninth.headers.get('retry-after')).toBeTruthy();
    expect(((await ninth.json()) as { code: string }).code).toBe('tenant_concurrency_limited');
    controller.abort();
    await json(api, 'POST', `/v1/training/jobs/${id}/cancel`);
    // closed streams give their slots back
    await until(
      'a slot to be free again',
      async () => {
        const res = await fetch(`${api.url}/v1/training/jobs/${id}/events?stream=false`);
        const live = await fetch(`${api.url}/v1/training/jobs/${id}/events?stream=true`);
        await live.body?.cancel();
        return res.status === 200 && live.status === 200;
      },
      10_000,
    );
  });
});

describe('finding 3: a large batch trains in planned micro-batches, within the memory budget', () => {
  it("16 rows of ~500 tokens in one batch: the worker's memory stays near the budget, not the batch", { timeout: 240_000 }, async () => {
    const model = await loadModel(STORIES);
    const rows = Array.from({ length: 16 }, (_, i) => ({
      prompt: `Story ${i}.` + ' Once upon a time there was a little girl who liked to play.'.repeat(24),
      completion: ' The end.',
    }));
    const longest = Math.max(...tokenizeRows(rows, model.tokenizer, model.config.maxPositions).map((e) => e.tokens.length));
    expect(longest).toBeGreaterThan(450);
    expect(longest).toBeLessThanOrEqual(model.config.maxPositions);
    const budget = stepBytes(model.config, 2, longest); // two rows a pass: 8 passes
    const MiB = 1024 ** 2;
    // what the worker may grow by: the budget, plus the training session and the rows themselves
    const boundMb = budget / MiB + 200;
    // the unsplit batch's estimate is far beyond it, so the bound tells split from unsplit
    expect(stepBytes(model.config, 16, longest) / MiB).toBeGreaterThan(2.5 * boundMb);
    const own = await startServerProcess({ args: ['--train-memory-budget', String(budget), '--poll-ms', '100'] });
    const ownApi = { url: own.url };
    try {
      const workerPid = Number(own.logs.find((l) => l.msg === 'training worker started')!.pid);
      // batch work yields the cores to the server's requests
      expect(getPriority(workerPid)).toBe(WORKER_NICENESS);
      // measured from a ready worker (model loaded), which logs through its server's stdout
      await until('the worker to be ready', async () => own.logs.some((l) => l.msg === 'training worker ready'));
      const before = rssMb(workerPid);
      let peak = before;
      const sampler = setInterval(() => {
        if (alive(workerPid)) peak = Math.max(peak, rssMb(workerPid));
      }, 10);
      let done: any;
      try {
        // the work runs in the worker process, at nice 10: the server's /healthz keeps its bound
        const probe = await whileProbing(ownApi, own.proc.pid!, async () => {
          const created = await json(ownApi, 'POST', '/v1/training/jobs', {
            data: rows,
            intervention: { kind: 'loreft', rank: 2, layers: [1, 3], positions: 'f1+l1' },
            hyperparameters: { epochs: 1, batch_size: 16 },
          });
          expect(created.status, JSON.stringify(created.body)).toBe(202);
          return until('the job to end', async () => {
            const j = (await json(ownApi, 'GET', `/v1/training/jobs/${created.body.id}`)).body;
            return ['succeeded', 'failed', 'cancelled'].includes(j.status) && j;
          });
        });
        done = probe.result;
        expectHealthzResponsive(probe);
      } finally {
        clearInterval(sampler);
      }
      expect(done.status, JSON.stringify(done)).toBe('succeeded');
      expect(done.progress).toMatchObject({ step: 1, total_steps: 1, micro_batches: 8 });
      if (process.env.REFT_TEST_PROBE_LOG)
        console.log(`worker RSS ${before.toFixed(0)} → ${peak.toFixed(0)} MB, bound +${boundMb.toFixed(0)} MB`);
      expect(peak - before, `worker RSS ${before.toFixed(0)} → ${peak.toFixed(0)} MB`).toBeLessThan(boundMb);
      await stillGenerates(ownApi);
    } finally {
      expect(await own.stop()).toBe(0);
    }
  });
});
