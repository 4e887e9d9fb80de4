import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { json, metricValue, sse, upload, type Api } from './support/http.ts';
import { storiesWithChatTemplate } from './support/model-copies.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * The prefix cache over HTTP on real server processes (stories260k, the CPU): what requests
 * report (`usage.prompt_tokens_details.cached_tokens`, the metrics), the namespaces (tenants,
 * cache salts, a server that shares between tenants), opting out, a replaced artifact, and a
 * conversation whose second turn reuses the first.
 */
const ADMIN = 'admin-key-for-the-prefix-cache-tests-0123456789';
const STORY =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. One day, they saw a big red ball under a tree. Lily ran to get it, but Max was faster. They played all day until the sun went down, and then they went home to eat dinner with Mom and Dad. After dinner, Lily told Mom about the big red ball and the fast dog. Mom smiled and said that Max was a good friend.';

let server: ServerProcess;
let shared: ServerProcess;
let admin: Api;
let a: Api;
let b: Api;

async function tenantKey(name: string): Promise<string> {
  const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name });
  expect(tenant.status).toBe(201);
  return (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body.key;
}

const cached = (res: { body: any }) => res.body.usage.prompt_tokens_details.cached_tokens as number;
const generate = (api: Api, extra: Record<string, unknown> = {}) =>
  json(api, 'POST', '/v1/generate', { prompt: STORY, max_new_tokens: 8, ignore_eos: true, ...extra });
/** The story behind a word of its own, so that no other test's blocks are its prefix. */
const story = (word: string) => `${word}. ${STORY}`;

beforeAll(async () => {
  const model = storiesWithChatTemplate();
  [server, shared] = await Promise.all([
    startServerProcess({ env: { REFT_ADMIN_KEY: ADMIN }, args: ['--model', model, '--no-worker'] }),
    startServerProcess({ args: ['--model', model, '--no-worker', '--prefix-cache-shared', '--prefix-cache-bytes', '4MiB'] }),
  ]);
  admin = { url: server.url, key: ADMIN };
  a = { url: server.url, key: await tenantKey('alpha') };
  b = { url: server.url, key: await tenantKey('beta') };
}, 120_000);
afterAll(async () => {
  expect(await server.stop()).toBe(0);
  expect(await shared.stop()).toBe(0);
});

const metric = (s: ServerProcess, line: string): Promise<number> =>
  metricValue({ url: s.url, key: s === server ? ADMIN : undefined }, line);

describe('the prefix cache over HTTP', () => {
  it('a prompt sent again reuses its full blocks: the same tokens, and usage and the metrics say how many were cached', async () => {
    const first = await generate(a);
    const second = await generate(a);
    expect(first.status).toBe(200);
    const prompt = first.body.usage.prompt_tokens as number;
    expect(prompt).toBeGreaterThan(128);
    expect(cached(first)).toBe(0);
    expect(cached(second)).toBe(Math.floor((prompt - 1) / 64) * 64);
    expect(second.body.token_ids).toEqual(first.body.token_ids);
    // streamed: the done event carries the usage
    const res = await fetch(`${server.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${a.key}` },
      body: JSON.stringify({ prompt: STORY, max_new_tokens: 8, ignore_eos: true, stream: true }),
    });
    const done = ((await sse(res)) as Array<Record<string, any>>).at(-1)!;
    expect(done.usage.prompt_tokens_details.cached_tokens).toBe(cached(second));
    expect(await metric(server, 'reft_prefix_cache_prompt_tokens_total{source="cached"}')).toBe(2 * cached(second));
    expect(await metric(server, 'reft_prefix_cache_hits_total')).toBe(2);
    expect(await metric(server, 'reft_prefix_cache_bytes')).toBeGreaterThan(0);
  });

  it("tenant B never hits tenant A's blocks; a cache salt narrows a tenant's namespace", async () => {
    await generate(a, { prompt: story('Tenants'), max_new_tokens: 2 });
    expect(cached(await generate(b, { prompt: story('Tenants'), max_new_tokens: 2 }))).toBe(0);
    expect(cached(await generate(a, { prompt: story('Tenants'), max_new_tokens: 2 }))).toBeGreaterThan(0);
    const salted = { prompt: story('Salts'), max_new_tokens: 2 };
    expect(cached(await generate(a, { ...salted, cache_salt: 'x' }))).toBe(0);
    expect(cached(await generate(a, { ...salted, cache_salt: 'y' }))).toBe(0);
    expect(cached(await generate(a, salted))).toBe(0);
    expect(cached(await generate(a, { ...salted, cache_salt: 'x' }))).toBeGreaterThan(0);
  });

  it('a request that opts out computes its prompt whole and leaves nothing behind', async () => {
    const prompt = { prompt: story('Opting'), max_new_tokens: 2 };
    expect(cached(await generate(a, { ...prompt, cache_prompt: false }))).toBe(0);
    expect(cached(await generate(a, prompt))).toBe(0);
    expect(cached(await generate(a, { ...prompt, cache_prompt: false }))).toBe(0);
    expect(cached(await generate(a, prompt))).toBeGreaterThan(0);
  });

  it("a replaced artifact never hits its old version's blocks", async () => {
    const up = async (seed: number, replace: boolean) => {
      const res = await upload(a, artifact([randomLoreft(seed, 1, 4, 'f5+l2')], { name: 'styled' }), replace ? { replace: 'true' } : {});
      expect(res.status, JSON.stringify(res.body)).toBe(replace ? 200 : 201);
      return res.body.id as string;
    };
    const id = await up(31, false);
    const cold = await generate(a, { adapter: id, prompt: story('Replaced') });
    expect(cached(await generate(a, { adapter: id, prompt: story('Replaced') }))).toBeGreaterThan(0);
    await up(32, true);
    const replaced = await generate(a, { adapter: id, prompt: story('Replaced') });
    expect(cached(replaced)).toBe(0); // the f5 edits start in block 0: nothing is the base model's
    const whole = await generate(a, { adapter: id, prompt: story('Replaced'), cache_prompt: false });
    expect(replaced.body.token_ids).toEqual(whole.body.token_ids);
    expect(replaced.body.token_ids).not.toEqual(cold.body.token_ids);
  });

  it('a server that shares between tenants (single-tenant deployments) shares its blocks', async () => {
    const open: Api = { url: shared.url };
    expect(cached(await generate(open))).toBe(0);
    expect(cached(await generate(open))).toBeGreaterThan(0);
    expect(shared.logs.find((l) => l.msg === 'model ready')).toMatchObject({ prefixCacheBytes: 4 * 2 ** 20, prefixCacheShared: true });
  });

  for (const withIntervention of [false, true]) {
    it(`turn 2 of a chat reuses at least 80% of turn 1's prompt${withIntervention ? ', with an l-only intervention' : ''} (the OpenAI client)`, async () => {
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: b.key });
      let model = (await client.models.list()).data[0].id;
      if (withIntervention) {
        const res = await upload(b, artifact([randomLoreft(41, 2, 4, 'l3')], { name: 'chat-style' }));
        expect(res.status).toBe(201);
        model = 'chat-style';
      }
      const messages: Array<{ role: 'system' | 'user' | 'assistant'; content: string }> = [
        { role: 'system', content: STORY },
        { role: 'user', content: `Tell me about Lily and Max${withIntervention ? '.' : '!'}` },
      ];
      const turn1 = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0 });
      messages.push(
        { role: 'assistant', content: turn1.choices[0].message.content ?? '' },
        { role: 'user', content: 'What happened next?' },
      );
      const turn2 = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0 });
      const cachedTokens = (turn2.usage as any).prompt_tokens_details.cached_tokens as number;
      expect(cachedTokens).toBeGreaterThanOrEqual(0.8 * turn1.usage!.prompt_tokens);
      // the OpenAI shape, and the same as computing the conversation whole
      const whole = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0, cache_prompt: false } as any);
      expect(turn2.choices[0].message.content).toBe(whole.choices[0].message.content);
      expect((whole.usage as any).prompt_tokens_details.cached_tokens).toBe(0);
    });
  }
});
