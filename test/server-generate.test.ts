import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../src/model/load.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { artifact, fixtureArtifact, randomLoreft } from './support/artifacts.ts';
import { STORIES, inferenceCases } from './support/fixtures.ts';
import { json, sse, upload, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';
import { BACKENDS } from './support/databases.ts';

/** The text `ids` add after `prompt`, as the server reports a completion (leading space kept). */
function continuation(tokenizer: TextTokenizer, prompt: number[], ids: number[]): string {
  return tokenizer.decode([...prompt, ...ids]).slice(tokenizer.decode(prompt).length);
}

describe.each(BACKENDS)('on %s', (backend) => {
  let server: ServerProcess;
  let api: Api;
  let tokenizer: TextTokenizer;
  const cases = inferenceCases();

  beforeAll(async () => {
    server = await startServerProcess({ backend, args: ['--tenant-max-concurrent', '64'] });
    api = { url: server.url };
    tokenizer = (await loadModel(STORIES)).tokenizer;
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  describe('generation over HTTP with uploaded interventions', () => {
    const ids: Record<string, string> = {};

    it('uploads every fixture case as an artifact', async () => {
      for (const c of cases.filter((c) => c.spec.length)) {
        const res = await upload(api, fixtureArtifact(c));
        expect(res.status, JSON.stringify(res.body)).toBe(201);
        expect(res.body).toMatchObject({ object: 'intervention', name: c.name, version: 1, shared: false });
        ids[c.name] = res.body.id;
      }
    });

    it('/v1/generate with input_ids gives each case its reference greedy tokens', async () => {
      for (const c of cases) {
        const res = await json(api, 'POST', '/v1/generate', {
          adapter: ids[c.name],
          input_ids: c.prompt,
          max_new_tokens: 24,
          ignore_eos: true,
        });
        expect(res.status, JSON.stringify(res.body)).toBe(200);
        expect(res.body.token_ids, c.name).toEqual(c.greedy);
        expect(res.body).toMatchObject({
          adapter: ids[c.name] ?? null,
          finish_reason: 'length',
          usage: { prompt_tokens: c.prompt.length, completion_tokens: 24, total_tokens: c.prompt.length + 24 },
        });
      }
    });

    it('/v1/completions (token-id prompt, temperature 0) gives the same tokens', async () => {
      for (const c of cases) {
        const res = await json(api, 'POST', '/v1/completions', {
          model: ids[c.name] ?? STORIES,
          prompt: c.prompt,
          max_tokens: 24,
          temperature: 0,
          ignore_eos: true,
          logprobs: 1,
        });
        expect(res.status, JSON.stringify(res.body)).toBe(200);
        expect(res.body.choices[0].text, c.name).toBe(continuation(tokenizer, c.prompt, c.greedy));
        expect(res.body.choices[0].logprobs.token_logprobs).toHaveLength(24);
        expect(res.body.usage).toEqual({
          prompt_tokens: c.prompt.length,
          completion_tokens: 24,
          total_tokens: c.prompt.length + 24,
          prompt_tokens_details: { cached_tokens: 0 },
        });
      }
    });

    it('adapters can be named instead of by id', async () => {
      const c = cases[3];
      const res = await json(api, 'POST', '/v1/generate', { adapter: c.name, input_ids: c.prompt, max_new_tokens: 24, ignore_eos: true });
      expect(res.body.token_ids).toEqual(c.greedy);
    });

    it('16 concurrent requests over 16 interventions plus base rows each get what they get alone', async () => {
      const prompts = ['Once upon a time', 'The little dog', 'One day, a girl named Sue', 'Tom and his mom went', 'There was a big tree'];
      const adapters: string[] = [];
      for (let i = 0; i < 16; i++) {
        const res = await upload(api, artifact([randomLoreft(100 + i, i % 5, 2 + (i % 3), i % 2 ? 'f2+l2' : 'l3')], { name: `rand-${i}` }));
        expect(res.status).toBe(201);
        adapters.push(res.body.id);
      }
      const requests = [
        ...adapters.map((a, i) => ({ adapter: a, prompt: prompts[i % prompts.length] })),
        ...prompts.slice(0, 4).map((p) => ({ prompt: p })),
      ];
      const body = (r: (typeof requests)[number]) => ({ ...r, max_new_tokens: 20, ignore_eos: true });
      const alone: number[][] = [];
      for (const r of requests) alone.push((await json(api, 'POST', '/v1/generate', body(r))).body.token_ids);
      const together = await Promise.all(requests.map((r) => json(api, 'POST', '/v1/generate', body(r))));
      together.forEach((res, i) => expect(res.body.token_ids, `request ${i}`).toEqual(alone[i]));
      // the interventions matter: most rows differ from the same prompt without one
      const differing = adapters.filter(
        (_, i) => JSON.stringify(alone[i]) !== JSON.stringify(alone[16 + ((i % prompts.length) % 4)]) || i % prompts.length === 4,
      );
      expect(differing.length).toBeGreaterThan(8);
    });

    it('streaming yields the same tokens as non-streaming', async () => {
      for (const c of cases.slice(0, 4)) {
        const body = { adapter: ids[c.name], input_ids: c.prompt, max_new_tokens: 24, ignore_eos: true };
        const plain = await json(api, 'POST', '/v1/generate', body);
        const res = await fetch(`${api.url}/v1/generate`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ ...body, stream: true }),
        });
        expect(res.headers.get('content-type')).toContain('text/event-stream');
        const events = (await sse(res)) as Array<Record<string, any>>;
        const tokens = events.filter((e) => e.type === 'token').map((e) => e.token_id);
        expect(tokens).toEqual(plain.body.token_ids);
        const done = events.at(-1)!;
        expect(done.type).toBe('done');
        expect(done.token_ids).toEqual(plain.body.token_ids);
        expect(
          events
            .filter((e) => e.type === 'token')
            .map((e) => e.text)
            .join(''),
        ).toBe(plain.body.text);
      }
    });

    it('sampling with the same seed gives the same text; stop strings cut the text', async () => {
      const body = { prompt: 'Once upon a time', temperature: 0.9, top_p: 0.95, top_k: 50, seed: 42, max_new_tokens: 30 };
      const a = await json(api, 'POST', '/v1/generate', body);
      const b = await json(api, 'POST', '/v1/generate', body);
      expect(a.body.text).toBe(b.body.text);
      const stopped = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 30, stop: ['Lily'] });
      expect(stopped.body).toMatchObject({ text: ', there was a little girl named ', finish_reason: 'stop', stop_reason: 'Lily' });
    });

    it('logprobs come per token', async () => {
      const res = await json(api, 'POST', '/v1/generate', {
        prompt: 'Once upon a time',
        max_new_tokens: 5,
        logprobs: true,
        top_logprobs: 3,
      });
      expect(res.body.logprobs).toHaveLength(5);
      for (const lp of res.body.logprobs) {
        expect(lp.logprob).toBeLessThanOrEqual(0);
        expect(lp.top_logprobs).toHaveLength(3);
        expect(lp.top_logprobs[0].token_id).toBe(lp.token_id); // greedy picks the most likely
      }
    });
  });

  describe('the official openai client', () => {
    it('completions, streaming completions and the model list', async () => {
      const client = new OpenAI({ baseURL: `${api.url}/v1`, apiKey: 'unused' });
      const c = cases[1];
      const completion = await client.completions.create({
        model: 'loreft_l1',
        prompt: c.prompt,
        max_tokens: 24,
        temperature: 0,
        ignore_eos: true,
      } as never);
      expect(completion.choices[0].text).toBe(continuation(tokenizer, c.prompt, c.greedy));
      const stream = await client.completions.create({
        model: 'loreft_l1',
        prompt: c.prompt,
        max_tokens: 24,
        temperature: 0,
        stream: true,
        ignore_eos: true,
      } as never);
      let text = '';
      for await (const chunk of stream as unknown as AsyncIterable<OpenAI.Completion>) text += chunk.choices[0]?.text ?? '';
      expect(text).toBe(completion.choices[0].text);
      const models = await client.models.list();
      const names = models.data.map((m) => m.id);
      expect(names[0]).toBe('stories260k'); // issue 11: the served name, never the local path
      expect(names.length).toBeGreaterThan(5);
    });
  });
});
