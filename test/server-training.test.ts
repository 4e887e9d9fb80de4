import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../src/model/load.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { STORIES } from './support/fixtures.ts';
import { json, sse, type Api } from './support/http.ts';
import { BIN, startServerProcess, type ServerProcess } from './support/server.ts';
import { HELD_OUT_OPENINGS, NEW_SENTENCE, TRAIN_OPENINGS } from './support/training-data.ts';
import { BACKENDS, createDatabase, dropDatabase } from './support/databases.ts';
import { tokenizeRows } from '../src/training/data.ts';
import { stepBytes } from '../src/training/memory.ts';

const jsonl = TRAIN_OPENINGS.map((prompt) => JSON.stringify({ prompt, completion: NEW_SENTENCE })).join('\n') + '\n';
const RECIPE = {
  intervention: { kind: 'loreft', rank: 4, layers: 'all', positions: 'f3+l3' },
  hyperparameters: { epochs: 30, learning_rate: 1e-2, batch_size: 1, lr_scheduler: 'linear', seed: 1 },
};

describe.each(BACKENDS)('on %s', (backend) => {
  /** Issue 4 end to end: files, jobs, events, cancellation, a killed worker, the CLI. */
  let server: ServerProcess;
  let api: Api;
  let tokenizer: TextTokenizer;

  beforeAll(async () => {
    server = await startServerProcess({ backend, args: ['--lease-ms', '1500', '--checkpoint-ms', '200', '--poll-ms', '100'] });
    api = { url: server.url };
    tokenizer = (await loadModel(STORIES)).tokenizer;
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  async function uploadFile(text: string, filename = 'data.jsonl') {
    const form = new FormData();
    form.append('file', new Blob([text]), filename);
    form.append('purpose', 'fine-tune');
    const res = await fetch(`${api.url}/v1/files`, { method: 'POST', body: form });
    return { status: res.status, body: (await res.json()) as any };
  }

  async function waitFor(id: string, states: string[], timeoutMs = 120_000): Promise<any> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const job = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
      if (states.includes(job.status)) return job;
      if (Date.now() > until) throw new Error(`job ${id} still ${job.status}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  function completionTokens(opening: string): number[] {
    const prompt = tokenizer.encode(opening);
    return tokenizer.encode(opening + NEW_SENTENCE).slice(prompt.length);
  }

  describe('training jobs over HTTP', () => {
    it('upload a file, train, follow the events to success, and generate with the result', async () => {
      const file = await uploadFile(jsonl);
      expect(file.status).toBe(201);
      expect(file.body).toMatchObject({ object: 'file', rows: 20, purpose: 'fine-tune' });
      const created = await json(api, 'POST', '/v1/training/jobs', { training_file: file.body.id, ...RECIPE, name: 'frog-song' });
      expect(created.status, JSON.stringify(created.body)).toBe(202);
      expect(created.body).toMatchObject({ status: 'queued', name: 'frog-song', intervention: { kind: 'loreft', rank: 4 } });
      const res = await fetch(`${api.url}/v1/training/jobs/${created.body.id}/events`, { headers: { accept: 'text/event-stream' } });
      const events = (await sse(res)) as any[];
      const metrics = events.filter((e) => e.type === 'metrics');
      expect(metrics.length).toBeGreaterThan(1);
      expect(metrics.at(-1).data).toMatchObject({ step: 600, total_steps: 600 });
      for (const m of metrics)
        expect(Object.keys(m.data)).toEqual(expect.arrayContaining(['step', 'loss', 'learning_rate', 'tokens_per_second', 'eta_seconds']));
      expect(metrics.at(-1).data.loss).toBeLessThan(metrics[0].data.loss);
      const end = events.at(-1);
      expect(end.type).toBe('end');
      expect(end.job.status).toBe('succeeded');
      const ivId = end.job.intervention_id;
      expect(ivId).toMatch(/^iv_/);
      // the result is usable at once, by id or by name
      let hits = 0;
      for (const opening of HELD_OUT_OPENINGS) {
        const target = completionTokens(opening);
        const gen = await json(api, 'POST', '/v1/generate', { adapter: 'frog-song', prompt: opening, max_new_tokens: target.length });
        if (target.every((t, i) => gen.body.token_ids[i] === t)) hits++;
        const base = await json(api, 'POST', '/v1/generate', { prompt: opening, max_new_tokens: target.length });
        expect(target.every((t, i) => base.body.token_ids[i] === t)).toBe(false);
      }
      expect(hits).toBeGreaterThanOrEqual(18);
      const iv = await json(api, 'GET', `/v1/interventions/${ivId}`);
      expect(iv.body).toMatchObject({ name: 'frog-song', source: 'training' });
      const list = await json(api, 'GET', '/v1/training/jobs');
      expect(list.body.data.map((j: { id: string }) => j.id)).toContain(created.body.id);
      const usage = await json(api, 'GET', '/v1/usage');
      expect(usage.body.totals.training_tokens).toBeGreaterThan(600 * 20);
      const plain = await json(api, 'GET', `/v1/training/jobs/${created.body.id}/events?limit=5`);
      expect(plain.body.data).toHaveLength(5);
      expect(plain.body.has_more).toBe(true);
    });

    it('inline data works, and a bad row is a 400 that names its line', async () => {
      const bad = jsonl.split('\n');
      bad[6] = '{"prompt": "x"}';
      const file = await uploadFile(bad.join('\n'));
      expect(file.status).toBe(400);
      expect(file.body).toMatchObject({ code: 'training_row_invalid', field: 'file:line 7' });
      const notJson = await uploadFile('{"prompt": "a", "completion": "b"}\n{oops\n');
      expect(notJson.body).toMatchObject({ code: 'training_line_not_json', field: 'file:line 2' });
      const inline = await json(api, 'POST', '/v1/training/jobs', { data: [{ prompt: 'a', completion: ' b' }, { prompt: 3 }], ...RECIPE });
      expect(inline.status).toBe(400);
      expect(inline.body.field).toBe('data.1');
      const badRecipe = await json(api, 'POST', '/v1/training/jobs', {
        data: [{ prompt: 'a', completion: ' b' }],
        intervention: { kind: 'loreft', rank: 0 },
      });
      expect(badRecipe.status).toBe(400);
      expect(badRecipe.body.field).toBe('intervention.rank');
      const layer = await json(api, 'POST', '/v1/training/jobs', {
        data: [{ prompt: 'a', completion: ' b' }],
        intervention: { layers: [9] },
      });
      expect(layer.body.code).toBe('recipe_layer_out_of_range');
    });

    it('cancel stops a running job', async () => {
      const created = await json(api, 'POST', '/v1/training/jobs', {
        data: TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE })),
        ...RECIPE,
        hyperparameters: { ...RECIPE.hyperparameters, epochs: 5000 },
      });
      expect(created.status).toBe(202);
      const running = await waitFor(created.body.id, ['running']);
      expect(running.status).toBe('running');
      await new Promise((r) => setTimeout(r, 300));
      const cancel = await json(api, 'POST', `/v1/training/jobs/${created.body.id}/cancel`);
      expect(cancel.status).toBe(200);
      const done = await waitFor(created.body.id, ['cancelled', 'failed', 'succeeded'], 10_000);
      expect(done.status).toBe('cancelled');
      expect(done.intervention_id).toBeNull();
    });

    it('kill -9 of the worker mid-job: the job resumes from its checkpoint and succeeds', async () => {
      const created = await json(api, 'POST', '/v1/training/jobs', {
        data: TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE })),
        ...RECIPE,
        hyperparameters: { ...RECIPE.hyperparameters, epochs: 150 },
        name: 'survivor',
      });
      await waitFor(created.body.id, ['running']);
      // wait until a checkpoint was taken (progress past a few hundred steps)
      for (;;) {
        const job = (await json(api, 'GET', `/v1/training/jobs/${created.body.id}`)).body;
        if ((job.progress?.step ?? 0) > 400) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      const pid = Number(server.logs.filter((l) => l.msg === 'training worker started').at(-1)!.pid);
      process.kill(pid, 'SIGKILL');
      const done = await waitFor(created.body.id, ['succeeded', 'failed', 'cancelled']);
      expect(done.status).toBe('succeeded');
      expect(done.attempts).toBe(2);
      const events = (await json(api, 'GET', `/v1/training/jobs/${created.body.id}/events?limit=1000`)).body.data;
      const resumed = events.find((e: any) => e.type === 'log' && /resumed at step/.test(e.data.message));
      expect(resumed, JSON.stringify(events.filter((e: any) => e.type !== 'metrics'))).toBeTruthy();
      expect(Number(/resumed at step (\d+)/.exec(resumed.data.message)![1])).toBeGreaterThan(100);
      expect(server.logs.filter((l) => l.msg === 'training worker started').length).toBeGreaterThanOrEqual(2);
    });
  });

  describe('job budgets and restarts', () => {
    it('a server stopped mid-job hands the job back; the next worker resumes it from its checkpoint', async () => {
      const dataDir = mkdtempSync(join(tmpdir(), 'reft-handback-'));
      const database = backend === 'postgres' ? await createDatabase() : undefined;
      const args = ['--lease-ms', '30000', '--checkpoint-ms', '200', '--poll-ms', '100'];
      const first = await startServerProcess({ backend, database, dataDir, args });
      const a = { url: first.url };
      const created = await json(a, 'POST', '/v1/training/jobs', {
        data: TRAIN_OPENINGS.map((prompt) => ({ prompt, completion: NEW_SENTENCE })),
        ...RECIPE,
        hyperparameters: { ...RECIPE.hyperparameters, epochs: 100 },
      });
      for (;;) {
        const job = (await json(a, 'GET', `/v1/training/jobs/${created.body.id}`)).body;
        if ((job.progress?.step ?? 0) > 300) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(await first.stop('SIGTERM')).toBe(0);
      // a 30 s lease: only a job handed back on SIGTERM is claimed again this soon
      const second = await startServerProcess({ backend, database, dataDir, args });
      api = { url: second.url };
      try {
        const done = await waitFor(created.body.id, ['succeeded', 'failed', 'cancelled'], 60_000);
        expect(done.status).toBe('succeeded');
        expect(done.attempts).toBe(2);
        const events = (await json(api, 'GET', `/v1/training/jobs/${created.body.id}/events?limit=1000`)).body.data;
        const resumed = events.find((e: any) => e.type === 'log' && /resumed at step/.test(e.data.message));
        expect(Number(/resumed at step (\d+)/.exec(resumed.data.message)![1])).toBeGreaterThan(300);
      } finally {
        api = { url: server.url };
        expect(await second.stop()).toBe(0);
        if (database) await dropDatabase(database);
      }
    });

    it('jobs over their step or time budget fail with a reason; queued jobs survive a server restart', async () => {
      const dataDir = mkdtempSync(join(tmpdir(), 'reft-jobs-'));
      const database = backend === 'postgres' ? await createDatabase() : undefined;
      const first = await startServerProcess({ backend, database, dataDir, args: ['--no-worker'] });
      const a = { url: first.url };
      const rows = TRAIN_OPENINGS.slice(0, 4).map((prompt) => ({ prompt, completion: NEW_SENTENCE }));
      const small = await json(a, 'POST', '/v1/training/jobs', { data: rows, ...RECIPE, hyperparameters: { epochs: 2 } });
      const big = await json(a, 'POST', '/v1/training/jobs', { data: rows, ...RECIPE, hyperparameters: { epochs: 5000 } });
      const long = await json(a, 'POST', '/v1/training/jobs', { data: rows, ...RECIPE, hyperparameters: { epochs: 450 } });
      expect([small.status, big.status, long.status]).toEqual([202, 202, 202]);
      expect(await first.stop()).toBe(0);
      const second = await startServerProcess({
        backend,
        database,
        dataDir,
        args: ['--job-max-steps', '2000', '--job-max-seconds', '1', '--poll-ms', '100'],
      });
      api = { url: second.url };
      try {
        const ok = await waitFor(small.body.id, ['succeeded', 'failed']);
        expect(ok.status).toBe('succeeded');
        const over = await waitFor(big.body.id, ['succeeded', 'failed']);
        expect(over.status).toBe('failed');
        expect(over.error).toMatch(/needs 20000 steps, over the budget of 2000/);
        const slow = await waitFor(long.body.id, ['succeeded', 'failed']);
        expect(slow.status).toBe('failed');
        expect(slow.error).toMatch(/exceeded its time budget of 1 s at step \d+/);
      } finally {
        api = { url: server.url };
        expect(await second.stop()).toBe(0);
        if (database) await dropDatabase(database);
      }
    });
  });
});

describe('reft-server train', () => {
  it('trains locally with a progress bar and writes a valid artifact', () => {
    const dir = mkdtempSync(join(tmpdir(), 'reft-train-'));
    writeFileSync(join(dir, 'data.jsonl'), jsonl);
    const out = join(dir, 'out');
    const r = spawnSync(
      process.execPath,
      [
        BIN,
        'train',
        join(dir, 'data.jsonl'),
        '--out',
        out,
        '--model',
        STORIES,
        '--epochs',
        '3',
        '--rank',
        '2',
        '--layers',
        '1,3',
        '--name',
        'cli',
      ],
      { encoding: 'utf8', timeout: 120_000 },
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/trained 60 steps/);
    const config = JSON.parse(readFileSync(join(out, 'reft_config.json'), 'utf8'));
    expect(config).toMatchObject({
      format: 'reft/v1',
      name: 'cli',
      interventions: [{ layer: 1, rank: 2 }, { layer: 1 }, { layer: 3 }, { layer: 3 }],
    });
    const bad = spawnSync(process.execPath, [BIN, 'train', join(dir, 'missing.jsonl'), '--out', out, '--model', STORIES], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/cannot read/);
  });
});

describe('training memory budget (--train-memory-budget)', () => {
  it('a batch over the budget trains as several micro-batches; a row that alone exceeds it is a 413 naming the limit', async () => {
    const model = await loadModel(STORIES);
    const rows = TRAIN_OPENINGS.slice(0, 4).map((prompt) => ({ prompt, completion: NEW_SENTENCE }));
    const longest = Math.max(...tokenizeRows(rows, model.tokenizer, model.config.maxPositions).map((e) => e.tokens.length));
    // two of these rows fit a pass, a batch of four does not
    const budget = stepBytes(model.config, 2, longest);
    const server = await startServerProcess({ args: ['--train-memory-budget', String(budget), '--poll-ms', '100'] });
    const api = { url: server.url };
    try {
      const job = await json(api, 'POST', '/v1/training/jobs', {
        data: rows,
        intervention: { kind: 'loreft', rank: 2, layers: [1], positions: 'f1+l1' },
        hyperparameters: { epochs: 2, batch_size: 4, seed: 1 },
      });
      expect(job.status).toBe(202);
      const long = { prompt: TRAIN_OPENINGS.slice(0, 6).join(' '), completion: NEW_SENTENCE };
      const refused = await json(api, 'POST', '/v1/training/jobs', { data: [...rows, long], ...RECIPE });
      expect(refused.status).toBe(413);
      expect(refused.body.field).toBe('data');
      expect(refused.body.code).toBe('training_memory_exceeded');
      const until = Date.now() + 120_000;
      let done: any;
      while (!['succeeded', 'failed'].includes((done = (await json(api, 'GET', `/v1/training/jobs/${job.body.id}`)).body).status)) {
        if (Date.now() > until) throw new Error(`job still ${done.status}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(done.status, done.error).toBe('succeeded');
      expect(done.progress).toMatchObject({ step: 2, total_steps: 2 });
      expect(done.progress.micro_batches).toBeGreaterThan(1);
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });
});
