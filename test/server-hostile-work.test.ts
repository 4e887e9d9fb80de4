import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { json, type Api } from './support/http.ts';
import { expectHealthzResponsive, expectProblem, stillGenerates, whileProbing } from './support/probe.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';
import { OFFLOAD_JSON_BYTES } from '../src/server/json-body.ts';

/**
 * Issue 11, findings 4, 9, 10 (model name, job errors) and 11 (streaming over the concurrency limit), scaled
 * down: text is bounded before it is tokenized and tokenized off the event loop, a worker does
 * not outlive its server, and a stream over the tenant's limit is a real 429.
 */
const CONTEXT = 512; // stories260k
const MAX_PROMPT_CHARS = 16 * CONTEXT;

let server: ServerProcess;
let api: Api;

beforeAll(async () => {
  server = await startServerProcess({
    args: ['--max-training-chars', '20000', '--max-training-rows', '50', '--tenant-max-concurrent', '1', '--tenant-max-queued', '0'],
  });
  api = { url: server.url };
});
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('finding 4: prompts and training data are bounded before tokenizing, and tokenized off the event loop', () => {
  it('a 4 MB prompt is a 413 naming the prompt limit, at once', async () => {
    const probe = await whileProbing(api, server.proc.pid!, () =>
      json(api, 'POST', '/v1/generate', { prompt: 'x'.repeat(4_000_000), max_new_tokens: 1 }),
    );
    expectProblem(probe.result, 413, 'prompt_too_many_chars', 'prompt');
    expectHealthzResponsive(probe);
    expect(probe.rssGrowthMb).toBeLessThan(150);
    await stillGenerates(api);
  });

  it('a large body, parsed off the event loop, gets the answers a small one gets', async () => {
    const pad = 'y'.repeat(OFFLOAD_JSON_BYTES);
    expectProblem(await json(api, 'POST', '/v1/generate', `{"prompt": "${pad}",`), 400, 'body_not_json', 'body');
    const poisoned = await json(api, 'POST', '/v1/generate', `{"prompt": "${pad}", "__proto__": {"x": 1}}`);
    expectProblem(poisoned, 400, 'body_not_json', 'body');
    expect(poisoned.body.detail).toMatch(/prototype/);
    // parsed into the same object: the handler reads the prompt's length from it
    expectProblem(await json(api, 'POST', '/v1/generate', { prompt: pad, max_new_tokens: 1 }), 413, 'prompt_too_many_chars', 'prompt');
    await stillGenerates(api);
  });

  it('chat messages count together against the prompt limit', async () => {
    const messages = [0, 1, 2].map(() => ({ role: 'user', content: 'y'.repeat(MAX_PROMPT_CHARS / 2) }));
    const res = await json(api, 'POST', '/v1/chat/completions', { model: 'stories260k', messages, max_tokens: 1 });
    expect(res.status).toBe(413);
    expect(res.body.error).toMatchObject({ code: 'prompt_too_many_chars', param: 'messages' });
  });

  it('a prompt just inside the limit is tokenized while /healthz keeps answering, then refused for the context', async () => {
    const prompt = 'Once upon a time there was a little girl. '.repeat(Math.floor(MAX_PROMPT_CHARS / 43));
    const probe = await whileProbing(api, server.proc.pid!, () => json(api, 'POST', '/v1/generate', { prompt, max_new_tokens: 1 }));
    expect(probe.result.status, JSON.stringify(probe.result.body)).toBe(400);
    expect(probe.result.body).toMatchObject({ code: 'prompt_too_long', category: 'context_length_exceeded' });
    expectHealthzResponsive(probe);
    await stillGenerates(api);
  });

  it('a training file with more rows than the limit is a 413 at upload', async () => {
    const form = new FormData();
    form.append('file', new Blob(['{"prompt":"a","completion":" b"}\n'.repeat(51)]), 'd.jsonl');
    const res = await fetch(`${api.url}/v1/files`, { method: 'POST', body: form });
    expectProblem({ status: res.status, body: await res.json(), headers: res.headers }, 413, 'training_rows_too_many', 'file');
  });

  it('training data just inside the budgets is tokenized at job creation off the event loop, while /healthz keeps answering', async () => {
    // 48 rows (limit 50), 19,000-odd characters (limit 20,000): every row is tokenized to check it
    const rows = Array.from({ length: 48 }, (_, i) => ({
      prompt: `Story ${i}: once upon a time`,
      completion: ' there was a cat. '.repeat(21),
    }));
    const chars = rows.reduce((n, r) => n + r.prompt.length + r.completion.length, 0);
    expect(chars).toBeGreaterThan(18_000);
    expect(chars).toBeLessThanOrEqual(20_000);
    const probe = await whileProbing(api, server.proc.pid!, () =>
      json(api, 'POST', '/v1/training/jobs', { data: rows, hyperparameters: { max_steps: 1, batch_size: 1 } }),
    );
    expect(probe.result.status, JSON.stringify(probe.result.body)).toBe(202);
    expectHealthzResponsive(probe);
    await json(api, 'POST', `/v1/training/jobs/${probe.result.body.id}/cancel`);
    await stillGenerates(api);
  });

  it('training text over the character budget is a 413 at job creation, before tokenizing', async () => {
    const form = new FormData();
    form.append(
      'file',
      new Blob([`${JSON.stringify({ prompt: 'Once upon a time', completion: ' there was a cat. '.repeat(700) })}\n`.repeat(2)]),
      'd.jsonl',
    );
    const file = await fetch(`${api.url}/v1/files`, { method: 'POST', body: form });
    expect(file.status).toBe(201);
    const { id } = (await file.json()) as { id: string };
    const probe = await whileProbing(api, server.proc.pid!, () => json(api, 'POST', '/v1/training/jobs', { training_file: id }));
    expectProblem(probe.result, 413, 'training_chars_too_many', 'training_file');
    expectHealthzResponsive(probe);
  });
});

describe('finding 11: a stream over the tenant concurrency limit', () => {
  it('is a real HTTP 429 with Retry-After, decided before any event is sent', async () => {
    const first = fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 400, ignore_eos: true, stream: true }),
    });
    const running = await first;
    expect(running.status).toBe(200);
    const reader = running.body!.getReader();
    await reader.read(); // the first stream is under way and holds the tenant's one slot
    const second = await fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 4, stream: true }),
    });
    expect(second.status).toBe(429);
    expect(second.headers.get('retry-after')).toBe('1');
    expect(second.headers.get('content-type')).toContain('application/problem+json');
    expect(((await second.json()) as { code: string }).code).toBe('tenant_queue_full');
    await reader.cancel();
  });
});

describe('finding 10: the base model is named, not located, and engine failures are not quoted', () => {
  it('/v1/models lists the folder name, never the local path', async () => {
    const models = await json(api, 'GET', '/v1/models');
    expect(models.body.data[0].id).toBe('stories260k');
    expect(JSON.stringify(models.body)).not.toContain('/');
  });

  it("a job the engine fails on ends with a generic reason, never the engine's message or a path", async () => {
    const job = {
      data: [{ prompt: 'Once upon a time', completion: ' there was a cat.' }],
      intervention: { kind: 'loreft', rank: 1, layers: [4], positions: 'l1' },
      hyperparameters: { max_steps: 1, batch_size: 1 },
    };
    const graphs = join(server.dataDir, 'cache', 'graphs');
    const before = new Set(readdirSync(graphs));
    const finished = async (id: string) => {
      for (;;) {
        const j = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
        if (['succeeded', 'failed', 'cancelled'].includes(j.status)) return j;
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const first = await json(api, 'POST', '/v1/training/jobs', job);
    expect((await finished(first.body.id)).status).toBe('succeeded');
    // the worker cached this job's training graph: corrupt it, so ONNX Runtime fails to load it next time
    const built = readdirSync(graphs).filter((f) => !before.has(f));
    expect(built.length).toBe(1);
    writeFileSync(join(graphs, built[0]), 'not an onnx graph');
    const second = await json(api, 'POST', '/v1/training/jobs', job);
    const failed = await finished(second.body.id);
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/^internal error \(worker .+, job .+: see the worker log\)$/);
    expect(failed.error).not.toMatch(/onnx|protobuf|parse|\/tmp|graphs/i);
    await stillGenerates(api);
  });
});

describe('finding 9: a worker does not outlive its server', () => {
  it('exits within 5 s of its server being killed with SIGKILL', async () => {
    const victim = await startServerProcess();
    const started = victim.logs.find((l) => l.msg === 'training worker started');
    const workerPid = Number(started?.pid);
    expect(workerPid).toBeGreaterThan(0);
    expect(alive(workerPid)).toBe(true);
    await victim.stop('SIGKILL');
    const killedAt = Date.now();
    while (alive(workerPid) && Date.now() - killedAt < 5000) await new Promise((r) => setTimeout(r, 50));
    expect(alive(workerPid), `worker ${workerPid} still running ${Date.now() - killedAt} ms after its server was killed`).toBe(false);
  });
});
