import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inferenceCases } from './support/fixtures.ts';
import { json, metricValue, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * The host KV budget (--kv-budget) on a real server process, the mixed load of issue 23 scaled
 * to stories260k: one long prompt among many short streams. A token's keys and values take
 * 2 · 5 layers · 4 kv heads · 8 · 4 bytes = 1280 bytes, and a step holds the slabs (padded to
 * the longest row, in blocks of 64 tokens) and attention's present, a copy: rows × longest ×
 * 2560 bytes. The long request (300 + 40 tokens: 384 padded, 983 040 bytes) fits 1 200 000
 * alone, not beside a short one; short ones (at most 56 tokens: 64 padded, 163 840 bytes each)
 * fit seven at a time. A request of 400 + 100 tokens (1 310 720 bytes) never fits.
 */
const BUDGET = 1_200_000;
const cases = inferenceCases();
let server: ServerProcess;
let api: Api;

beforeAll(async () => {
  server = await startServerProcess({ args: ['--no-worker', '--kv-budget', String(BUDGET), '--tenant-max-concurrent', '64'] });
  api = { url: server.url };
}, 120_000);
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const metric = (name: string): Promise<number> => metricValue(api, name);

/** `n` prompt tokens: the fixture prompts over and over. */
function tokens(n: number): number[] {
  const all = cases.flatMap((c) => c.prompt);
  return Array.from({ length: n }, (_, i) => all[i % all.length]);
}

const generate = (input_ids: number[], max_new_tokens: number) =>
  json(api, 'POST', '/v1/generate', { input_ids, max_new_tokens, ignore_eos: true });

describe('the host KV budget', () => {
  it('is stated when the model is ready', () => {
    expect(server.logs.find((l) => l.msg === 'model ready')).toMatchObject({ kvCache: 'host', kvBudgetBytes: BUDGET });
  });

  it('one long prompt among 23 short streams: all complete as they do alone, within the budget; one that never fits is a 400 at once', async () => {
    const long = tokens(300);
    const shorts = Array.from({ length: 23 }, (_, i) => cases[i % cases.length].prompt.slice(0, 4 + (i % 12)));
    expect(Math.max(...shorts.map((s) => s.length))).toBeLessThanOrEqual(16);
    const alone: number[][] = [];
    for (const p of [long, ...shorts]) {
      const res = await generate(p, 40);
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      alone.push(res.body.token_ids);
    }

    let settled = false;
    let maxBatch = 0;
    let maxQueued = 0;
    let maxKvBytes = 0;
    const load = Promise.all([long, ...shorts].map((p) => generate(p, 40))).finally(() => (settled = true));
    const sampler = (async () => {
      while (!settled) {
        maxBatch = Math.max(maxBatch, await metric('reft_batch_size'));
        maxQueued = Math.max(maxQueued, await metric('reft_queue_depth'));
        maxKvBytes = Math.max(maxKvBytes, await metric('reft_kv_cache_bytes'));
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    while ((await metric('reft_running_sequences')) === 0) await new Promise((r) => setTimeout(r, 5));
    const never = await generate(tokens(400), 100);
    expect(settled).toBe(false); // refused while the load still ran, before any work of its own
    expect(never.status).toBe(400);
    expect(never.body).toMatchObject({ code: 'kv_budget_exceeded', field: 'max_new_tokens' });
    expect(never.body.detail).toContain('--kv-budget');

    const results = await load;
    await sampler;
    results.forEach((res, i) => {
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.body.token_ids, `request ${i}`).toEqual(alone[i]);
    });
    expect(maxBatch).toBeLessThanOrEqual(7);
    expect(maxQueued).toBeGreaterThan(0);
    expect(maxKvBytes).toBeGreaterThan(0);
    expect(maxKvBytes).toBeLessThanOrEqual(BUDGET);
    expect(await metric('reft_kv_cache_bytes')).toBe(0);
  });
});
