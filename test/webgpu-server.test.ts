import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, fixtureArtifact, randomLoreft } from './support/artifacts.ts';
import { inferenceCases } from './support/fixtures.ts';
import { json, metricValue, sse, upload, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * A real server process generating on the WebGPU device (Mesa's llvmpipe here), with its KV
 * cache on the device and a device KV budget of 600 000 bytes: on stories260k a token takes
 * 2 · 5 layers · 4 kv heads · 8 · 4 bytes = 1280 bytes, and a step holds its past and its
 * presents, padded to the longest row, so rows × their longest length × 2560 bytes must stay under it.
 */
const BUDGET = 600_000;
let server: ServerProcess;
let api: Api;
const cases = inferenceCases();

beforeAll(async () => {
  server = await startServerProcess({
    args: ['--device', 'webgpu', '--no-worker', '--device-kv-budget', String(BUDGET), '--tenant-max-concurrent', '64'],
  });
  api = { url: server.url };
}, 600_000);
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const metric = (name: string): Promise<number> => metricValue(api, name);

/** Runs `work` while sampling the batch size and queue depth; returns their peaks. */
async function watching<T>(work: () => Promise<T>): Promise<{ result: T; maxBatch: number; maxQueued: number }> {
  let done = false;
  let maxBatch = 0;
  let maxQueued = 0;
  const sampler = (async () => {
    while (!done) {
      maxBatch = Math.max(maxBatch, await metric('reft_batch_size'));
      maxQueued = Math.max(maxQueued, await metric('reft_queue_depth'));
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  const result = await work();
  done = true;
  await sampler;
  return { result, maxBatch, maxQueued };
}

describe('the server on WebGPU with the KV cache on the device', () => {
  const ids: Record<string, string> = {};

  it('generates every reference case with its intervention: the reference greedy tokens', async () => {
    for (const c of cases.filter((c) => c.spec.length)) {
      const res = await upload(api, fixtureArtifact(c));
      expect(res.status, JSON.stringify(res.body)).toBe(201);
      ids[c.name] = res.body.id;
    }
    for (const c of cases) {
      const res = await json(api, 'POST', '/v1/generate', {
        adapter: ids[c.name],
        input_ids: c.prompt,
        max_new_tokens: 20,
        ignore_eos: true,
      });
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.body.token_ids, c.name).toEqual(c.greedy.slice(0, 20));
    }
  });

  it('streams the same tokens; logprobs picked on the device match those computed from the logits', async () => {
    const c = cases[2];
    const body = { adapter: ids[c.name], input_ids: c.prompt, max_new_tokens: 16, ignore_eos: true };
    const res = await fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ ...body, stream: true }),
    });
    const events = (await sse(res)) as Array<Record<string, any>>;
    expect(events.filter((e) => e.type === 'token').map((e) => e.token_id)).toEqual(c.greedy.slice(0, 16));
    expect(events.at(-1)!.type).toBe('done');

    // logprobs alone: the graph's pick; with top_logprobs the host reads the logits
    const onDevice = await json(api, 'POST', '/v1/generate', { ...body, logprobs: true });
    const fromLogits = await json(api, 'POST', '/v1/generate', { ...body, logprobs: true, top_logprobs: 2 });
    expect(onDevice.body.token_ids).toEqual(fromLogits.body.token_ids);
    const a = onDevice.body.logprobs as Array<{ logprob: number }>;
    const b = fromLogits.body.logprobs as Array<{ logprob: number }>;
    expect(a).toHaveLength(16);
    a.forEach((x, i) => expect(x.logprob).toBeCloseTo(b[i].logprob, 3));
  });

  it('8 concurrent rows with different interventions each get what they get alone; a burst beyond the budget waits', async () => {
    const prompts = ['Once upon a time', 'The little dog', 'Tom and his mom went', 'There was a big tree'];
    const requests: Array<Record<string, unknown>> = [];
    for (let i = 0; i < 8; i++) {
      const res = await upload(api, artifact([randomLoreft(200 + i, i % 5, 2 + (i % 3), i % 2 ? 'f2+l2' : 'l3')], { name: `gpu-${i}` }));
      expect(res.status).toBe(201);
      requests.push({ adapter: res.body.id, prompt: prompts[i % prompts.length], max_new_tokens: 16, ignore_eos: true });
    }
    const alone: number[][] = [];
    for (const r of requests) alone.push((await json(api, 'POST', '/v1/generate', r)).body.token_ids);
    const base = await Promise.all(
      prompts.map((p) => json(api, 'POST', '/v1/generate', { prompt: p, max_new_tokens: 16, ignore_eos: true })),
    );
    expect(alone.filter((t, i) => JSON.stringify(t) !== JSON.stringify(base[i % 4].body.token_ids)).length).toBeGreaterThan(4);

    const together = await watching(() => Promise.all(requests.map((r) => json(api, 'POST', '/v1/generate', r))));
    together.result.forEach((res, i) => expect(res.body.token_ids, `request ${i}`).toEqual(alone[i]));
    expect(together.maxBatch).toBe(8);

    // 16 at once exceed the device budget: some wait in the queue, and all finish right
    const lengths = await Promise.all(prompts.map(async (p) => (await json(api, 'POST', '/tokenize', { prompt: p })).body.count as number));
    const fit = Math.floor(BUDGET / (2 * 1280 * (Math.max(...lengths) + 16)));
    expect(fit).toBeGreaterThanOrEqual(8);
    expect(fit).toBeLessThan(16);
    const burst = await watching(() => Promise.all([...requests, ...requests].map((r) => json(api, 'POST', '/v1/generate', r))));
    burst.result.forEach((res, i) => expect(res.body.token_ids, `burst ${i}`).toEqual(alone[i % 8]));
    expect(burst.maxBatch).toBeLessThanOrEqual(fit);
    expect(burst.maxQueued).toBeGreaterThan(0);
    expect(await metric('reft_kv_cache_bytes')).toBe(0);
  });

  it('a request whose cache alone would exceed the device budget is refused by name; the server stays up', async () => {
    const res = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 300 });
    expect(res.status).toBe(400);
    expect(res.body).toMatchObject({ code: 'device_kv_budget_exceeded', field: 'max_new_tokens' });
    const ok = await json(api, 'POST', '/v1/generate', { input_ids: cases[0].prompt, max_new_tokens: 8, ignore_eos: true });
    expect(ok.body.token_ids).toEqual(cases[0].greedy.slice(0, 8));
  });

  it('a cancelled stream leaves the batch and frees its device cache', async () => {
    const res = await fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 200, ignore_eos: true, stream: true }),
    });
    const reader = res.body!.getReader();
    await reader.read();
    await reader.read();
    expect(await metric('reft_running_sequences')).toBe(1);
    await reader.cancel();
    const until = Date.now() + 20_000;
    while ((await metric('reft_running_sequences')) !== 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    expect(await metric('reft_running_sequences')).toBe(0);
    expect(await metric('reft_kv_cache_bytes')).toBe(0);
    const after = await json(api, 'POST', '/v1/generate', {
      input_ids: cases[1].prompt,
      adapter: ids[cases[1].name],
      max_new_tokens: 8,
      ignore_eos: true,
    });
    expect(after.body.token_ids).toEqual(cases[1].greedy.slice(0, 8));
  });
});
