import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, fixtureArtifact, randomLoreft } from './support/artifacts.ts';
import { inferenceCases } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { sharedInterventionsFolder, storiesWithChatTemplate } from './support/model-copies.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

const cases = inferenceCases();
let server: ServerProcess;
let api: Api;
let sharedDir: string;

beforeAll(async () => {
  // a model copy with a chat template, and a shared-interventions folder with one artifact and one broken folder
  const model = storiesWithChatTemplate();
  sharedDir = sharedInterventionsFolder();
  mkdirSync(join(sharedDir, 'broken'));
  writeFileSync(join(sharedDir, 'broken', 'reft_config.json'), '{');
  server = await startServerProcess({
    args: ['--model', model, '--interventions-dir', sharedDir, '--max-batch-size', '1', '--max-queue', '1'],
  });
  api = { url: server.url };
});
afterAll(async () => {
  if (server.proc.exitCode === null) await server.stop();
});

describe('operations', () => {
  it('health, readiness and Prometheus metrics', async () => {
    expect((await json(api, 'GET', '/healthz')).body).toEqual({ status: 'ok' });
    expect((await json(api, 'GET', '/readyz')).body.status).toBe('ready');
    await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 5 });
    await json(api, 'POST', '/v1/generate', { adapter: 'house-style', prompt: 'Once upon a time', max_new_tokens: 5 });
    await json(api, 'POST', '/v1/generate', { adapter: 'house-style', prompt: 'Once upon a time', max_new_tokens: 5 });
    const text = await (await fetch(`${api.url}/metrics`)).text();
    for (const name of [
      'reft_http_requests_total',
      'reft_http_request_duration_seconds_bucket',
      'reft_time_to_first_token_seconds_bucket',
      'reft_generation_tokens_per_second_bucket',
      'reft_batch_size',
      'reft_queue_depth',
      'reft_adapter_cache_total',
    ]) {
      expect(text).toContain(name);
    }
    expect(text).toMatch(/reft_adapter_cache_total\{result="miss"\} 1/);
    expect(text).toMatch(/reft_adapter_cache_total\{result="hit"\} 1/);
    expect(text).toMatch(/reft_http_requests_total\{method="POST",route="\/v1\/generate",status="200"\} 3/);
  });

  it('says at start whether the weights get huge pages, and how to turn them on', async () => {
    // what Linux offers decides the expectation: 'always' gives them to every process, 'madvise'
    // only to glibc's malloc under the tunable that npm start sets
    const mode = /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1];
    const ready = (logs: Array<Record<string, unknown>>) => logs.find((l) => l.msg === 'model ready')!;
    const plain = ready(server.logs);
    expect(plain.hugePages).toBe(mode === 'always' ? 'on' : 'off');
    if (plain.hugePages === 'off') expect(plain.hint).toContain('GLIBC_TUNABLES=glibc.malloc.hugetlb=1');
    const tuned = await startServerProcess({ env: { GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1' } });
    try {
      const state = ready(tuned.logs);
      expect(state.hugePages).toBe(mode === 'never' ? 'off' : 'on');
      if (state.hugePages === 'on') expect(state.hint).toBeUndefined();
    } finally {
      await tuned.stop();
    }
  });

  it('serves the API description and its UI at /docs', async () => {
    const ui = await fetch(`${api.url}/docs`);
    expect(ui.status).toBe(200);
    expect(await ui.text()).toMatch(/swagger/i);
    const doc = (await json(api, 'GET', '/docs/json')).body;
    expect(doc.openapi).toBe('3.1.0');
    expect(doc.paths).toHaveProperty(['/v1/generate']);
  });

  it('registers interventions/<name>/ folders as shared interventions and skips broken ones', async () => {
    const list = await json(api, 'GET', '/v1/interventions');
    expect(list.body.data.map((i: { name: string; shared: boolean }) => [i.name, i.shared])).toEqual([['house-style', true]]);
    const res = await json(api, 'POST', '/v1/generate', {
      adapter: 'house-style',
      input_ids: cases[1].prompt,
      max_new_tokens: 24,
      ignore_eos: true,
    });
    expect(res.body.token_ids).toEqual(cases[1].greedy);
    expect(server.logs.some((l) => l.msg === 'skipping shared intervention' && l.name === 'broken')).toBe(true);
    expect((await json(api, 'DELETE', `/v1/interventions/${list.body.data[0].id}`)).status).toBe(403); // shared: not the tenant's to delete (issue 12: a 403 that says so)
  });

  it('downloads are byte-identical to the upload', async () => {
    const files = artifact([randomLoreft(5, 1)], { name: 'dl', description: 'kept as is' });
    const up = await upload(api, files);
    const config = new Uint8Array(await (await fetch(`${api.url}/v1/interventions/${up.body.id}/files/reft_config.json`)).arrayBuffer());
    const weights = new Uint8Array(
      await (await fetch(`${api.url}/v1/interventions/${up.body.id}/files/reft_weights.safetensors`)).arrayBuffer(),
    );
    expect(Buffer.from(config).toString()).toBe(files.config);
    expect(Buffer.compare(Buffer.from(weights), Buffer.from(files.weights))).toBe(0);
    expect((await json(api, 'DELETE', `/v1/interventions/${up.body.id}`)).status).toBe(204);
    expect((await json(api, 'GET', `/v1/interventions/${up.body.id}`)).status).toBe(404);
  });

  it('replacing or deleting an intervention takes effect on the next request (cache invalidated)', async () => {
    const prompt = cases[3].prompt;
    const gen = async () =>
      (await json(api, 'POST', '/v1/generate', { adapter: 'swap', input_ids: prompt, max_new_tokens: 24, ignore_eos: true })).body;
    expect((await upload(api, fixtureArtifact(cases[3]), { name: 'swap' })).status).toBe(201);
    expect((await gen()).token_ids).toEqual(cases[3].greedy);
    expect((await upload(api, fixtureArtifact(cases[3]), { name: 'swap' })).status).toBe(409);
    const replaced = await upload(api, artifact([randomLoreft(9, 3, 4, 'f3+l3', 64, 3)]), { name: 'swap', replace: 'true' });
    expect(replaced.status).toBe(200);
    expect(replaced.body.version).toBe(2);
    expect((await gen()).token_ids).not.toEqual(cases[3].greedy);
    expect((await json(api, 'DELETE', '/v1/interventions/swap')).status).toBe(204);
    expect((await json(api, 'POST', '/v1/generate', { adapter: 'swap', input_ids: prompt })).status).toBe(404);
  });

  it('paginates interventions', async () => {
    for (let i = 0; i < 5; i++) await upload(api, artifact([randomLoreft(30 + i, 0, 1)], { name: `page-${i}` }));
    const seen: string[] = [];
    let after: string | null = null;
    do {
      const page: any = (await json(api, 'GET', `/v1/interventions?limit=2${after ? `&after=${after}` : ''}`)).body;
      expect(page.data.length).toBeLessThanOrEqual(2);
      seen.push(...page.data.map((i: { name: string }) => i.name));
      after = page.next_cursor;
    } while (after);
    expect(seen).toEqual(['house-style', 'page-0', 'page-1', 'page-2', 'page-3', 'page-4']);
  });

  it('chat completions through the official openai client', async () => {
    const client = new OpenAI({ baseURL: `${api.url}/v1`, apiKey: 'unused' });
    const res = await client.chat.completions.create({
      model: 'house-style',
      messages: [{ role: 'user', content: 'Tell me a story.' }],
      max_tokens: 12,
      temperature: 0,
    });
    expect(res.choices[0].message.role).toBe('assistant');
    expect(res.choices[0].message.content!.length).toBeGreaterThan(0);
    expect(res.usage!.completion_tokens).toBeLessThanOrEqual(12);
    const stream = await client.chat.completions.create({
      model: 'house-style',
      messages: [{ role: 'user', content: 'Tell me a story.' }],
      max_tokens: 12,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? '';
      usage = chunk.usage ?? usage;
    }
    expect(text).toBe(res.choices[0].message.content);
    expect(usage).toEqual(res.usage);
  });

  it('a full queue answers 503 with Retry-After instead of growing', async () => {
    // batch size 1 and queue size 1: one stream runs, one request waits, the next is refused
    const controller = new AbortController();
    const running = await fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 500, ignore_eos: true, stream: true }),
      signal: controller.signal,
    });
    const reader = running.body!.getReader();
    await reader.read(); // it is generating
    const queued = json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 });
    let depth = 0;
    for (let i = 0; i < 100 && depth === 0; i++) {
      depth = Number(/reft_queue_depth (\d+)/.exec(await (await fetch(`${api.url}/metrics`)).text())![1]);
    }
    expect(depth).toBe(1);
    const refused = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 });
    expect(refused.status).toBe(503);
    expect(refused.headers.get('retry-after')).toBeTruthy();
    expect(refused.body).toMatchObject({ code: 'queue_full', category: 'overloaded' });
    controller.abort();
    expect((await queued).status).toBe(200);
  });

  it('a client that disconnects is dropped from the batch', async () => {
    const controller = new AbortController();
    const res = await fetch(`${api.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 500, ignore_eos: true, stream: true }),
      signal: controller.signal,
    });
    const reader = res.body!.getReader();
    await reader.read();
    controller.abort();
    const started = Date.now();
    // with the row gone, a new request gets the batch to itself quickly
    const next = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 });
    expect(next.status).toBe(200);
    let running = 1;
    while (Date.now() - started < 2000) {
      const m = await (await fetch(`${api.url}/metrics`)).text();
      running = Number(/reft_running_sequences (\d+)/.exec(m)![1]);
      if (running === 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(running).toBe(0);
  });

  it('SIGTERM: stops accepting, finishes in-flight generations, exits 0', async () => {
    const inFlight = json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 200, ignore_eos: true });
    await new Promise((r) => setTimeout(r, 200));
    const exit = server.stop('SIGTERM');
    const res = await inFlight;
    expect(res.status).toBe(200);
    expect(res.body.usage.completion_tokens).toBe(200);
    expect(await exit).toBe(0);
    await expect(fetch(`${api.url}/healthz`)).rejects.toThrow();
  });
});
