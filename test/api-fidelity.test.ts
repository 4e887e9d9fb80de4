import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../src/model/load.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { STORIES } from './support/fixtures.ts';
import { sharedInterventionsFolder, storiesWithChatTemplate } from './support/model-copies.ts';
import { json, sse, type Api } from './support/http.ts';
import { runCli, startServerProcess, type ServerProcess } from './support/server.ts';

/** What a new user meets following the README with curl and the official openai client (issue 12). */
describe('API fidelity (single-tenant server)', () => {
  let server: ServerProcess;
  let api: Api;
  let client: OpenAI;
  let tokenizer: TextTokenizer;
  let sharedDir: string;
  /** The base model's name, as /v1/models gives it. */
  let base: string;
  const PROMPT = 'Once upon a time there';
  const SERVED = 'karpathy/stories260k';

  beforeAll(async () => {
    const model = storiesWithChatTemplate();
    sharedDir = sharedInterventionsFolder();
    server = await startServerProcess({ args: ['--model', model, '--interventions-dir', sharedDir, '--served-model-name', SERVED] });
    api = { url: server.url };
    client = new OpenAI({ baseURL: `${api.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    tokenizer = (await loadModel(STORIES)).tokenizer;
    base = (await json(api, 'GET', '/v1/models')).body.data[0].id;
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  /** The text `ids` add after the prompt: decode of the whole minus decode of the prompt. */
  const after = (prompt: number[], ids: number[]) => tokenizer.decode([...prompt, ...ids]).slice(tokenizer.decode(prompt).length);

  describe('generated text keeps its spaces', () => {
    it('/v1/generate: the first token keeps its leading space; logprob texts join to the text', async () => {
      const res = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, max_new_tokens: 3, logprobs: true, top_logprobs: 2 });
      expect(res.status).toBe(200);
      const prompt = tokenizer.encode(PROMPT);
      expect(res.body.text).toBe(after(prompt, res.body.token_ids));
      expect(res.body.text).toMatch(/^ \S/);
      expect(PROMPT + res.body.text).toBe(tokenizer.decode([...prompt, ...res.body.token_ids]));
      expect(res.body.logprobs.map((l: { text: string }) => l.text).join('')).toBe(res.body.text);
      expect(res.body.logprobs[0].top_logprobs[0].text).toBe(res.body.logprobs[0].text);
    });

    it('stream events carry the same text, space first', async () => {
      const plain = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, max_new_tokens: 3 });
      const res = await fetch(`${api.url}/v1/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: PROMPT, max_new_tokens: 3, stream: true }),
      });
      const tokens = ((await sse(res)) as Array<Record<string, any>>).filter((e) => e.type === 'token');
      expect(tokens[0].text).toMatch(/^ /);
      expect(tokens.map((e) => e.text).join('')).toBe(plain.body.text);
    });

    it('OpenAI completion text, logprob tokens and chat bytes keep the space', async () => {
      const c = await client.completions.create({ model: base, prompt: PROMPT, max_tokens: 3, temperature: 0, logprobs: 1 });
      const text = c.choices[0].text;
      expect(text).toMatch(/^ \S/);
      expect(c.choices[0].logprobs!.tokens!.join('')).toBe(text);
      expect(c.choices[0].logprobs!.text_offset).toEqual(
        c.choices[0].logprobs!.tokens!.map((_, i, all) => all.slice(0, i).join('').length),
      );
      let streamed = '';
      for await (const chunk of await client.completions.create({
        model: base,
        prompt: PROMPT,
        max_tokens: 3,
        temperature: 0,
        stream: true,
      }))
        streamed += chunk.choices[0]?.text ?? '';
      expect(streamed).toBe(text);
      const gen = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, max_new_tokens: 3, logprobs: true });
      const firstId = gen.body.token_ids[0];
      expect(tokenizer.decode([firstId])).not.toMatch(/^ /); // decoding the token alone loses the space: the bug this guards
      expect(text).toBe(gen.body.text);
      const chat = await client.chat.completions.create({
        model: base,
        messages: [{ role: 'user', content: 'Tell me a story.' }],
        max_tokens: 4,
        temperature: 0,
        logprobs: true,
        top_logprobs: 1,
      });
      const content = chat.choices[0].message.content!;
      const entries = chat.choices[0].logprobs!.content!;
      expect(entries.map((e) => e.token).join('')).toBe(content);
      expect(Buffer.from(entries.flatMap((e) => e.bytes!)).toString('utf8')).toBe(content);
      expect(entries.some((e) => e.bytes![0] === 32)).toBe(true);
    });
  });

  /** What a call through the official client threw. */
  async function failure(p: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
    const err = await p.then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(OpenAI.APIError);
    return err as InstanceType<typeof OpenAI.APIError>;
  }

  describe("OpenAI routes answer errors in OpenAI's shape", () => {
    it('the official client sees message, type, param and code', async () => {
      const missing = await failure(client.completions.create({ model: 'nope', prompt: 'x' }));
      expect(missing).toMatchObject({ status: 404, code: 'model_not_found', param: 'model', type: 'not_found_error' });
      expect(missing.message).toMatch(/nope/); // the client shows the body's message (not "no body")
      const invalid = await failure(
        client.chat.completions.create({ model: base, messages: [{ role: 'user', content: 'hi' }], temperature: 5 }),
      );
      expect(invalid).toMatchObject({ status: 400, code: 'body_invalid', param: 'temperature', type: 'invalid_request_error' });
      const unknownModel = await failure(client.models.retrieve('nope'));
      expect(unknownModel).toMatchObject({ status: 404, code: 'model_not_found', param: 'model' });
    });

    it('as application/json with {error: {message, type, param, code}}; other routes keep problem+json', async () => {
      const res = await json(api, 'POST', '/v1/completions', { model: base, prompt: 'x', max_tokens: 0 });
      expect(res.status).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/^application\/json/);
      expect(res.body).toEqual({
        error: {
          message: expect.any(String),
          type: 'invalid_request_error',
          param: 'max_tokens',
          code: 'body_invalid',
        },
      });
      const generate = await json(api, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 0 });
      expect(generate.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(generate.body).toMatchObject({ status: 400, field: 'max_new_tokens' });
    });
  });

  describe('OpenAI parameters', () => {
    const ask = (body: Record<string, unknown>) =>
      client.completions.create({
        model: base,
        prompt: PROMPT,
        max_tokens: 6,
        temperature: 0,
        ...body,
      } as never) as unknown as Promise<OpenAI.Completion>;

    it('n gives several choices; sampled ones differ, greedy ones agree; usage counts each prompt once', async () => {
      const sampled = await ask({ n: 4, temperature: 1, seed: 7, max_tokens: 12 });
      expect(sampled.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
      expect(new Set(sampled.choices.map((c) => c.text)).size).toBeGreaterThan(1);
      const again = await ask({ n: 4, temperature: 1, seed: 7, max_tokens: 12 });
      expect(again.choices.map((c) => c.text)).toEqual(sampled.choices.map((c) => c.text));
      const greedy = await ask({ n: 2 });
      expect(greedy.choices[0].text).toBe(greedy.choices[1].text);
      const promptTokens = tokenizer.encode(PROMPT).length;
      expect(greedy.usage).toEqual({
        prompt_tokens: promptTokens,
        completion_tokens: 12,
        total_tokens: promptTokens + 12,
        prompt_tokens_details: { cached_tokens: 0 },
      });
      const chat = await client.chat.completions.create({
        model: base,
        messages: [{ role: 'user', content: 'Tell me a story.' }],
        n: 3,
        max_tokens: 5,
        temperature: 1,
        seed: 3,
      });
      expect(chat.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    });

    it('a list of prompts gives a completion each (n per prompt, in order), the same as asked alone', async () => {
      const prompts = [PROMPT, 'The little dog'];
      const both = await ask({ prompt: prompts, n: 2 });
      expect(both.choices).toHaveLength(4);
      for (const [i, p] of prompts.entries()) {
        const alone = await ask({ prompt: p });
        expect(both.choices[2 * i].text).toBe(alone.choices[0].text);
        expect(both.choices[2 * i + 1].text).toBe(alone.choices[0].text);
      }
      expect(both.usage!.prompt_tokens).toBe(prompts.reduce((n, p) => n + tokenizer.encode(p).length, 0));
      let streamed = ['', '', '', ''];
      for await (const chunk of (await client.completions.create({
        model: base,
        prompt: prompts,
        n: 2,
        max_tokens: 6,
        temperature: 0,
        stream: true,
      })) as AsyncIterable<OpenAI.Completion>) {
        for (const c of chunk.choices) streamed[c.index] += c.text;
      }
      expect(streamed).toEqual(both.choices.map((c) => c.text));
    });

    it('stop as a string or a list', async () => {
      const plain = await ask({ max_tokens: 30 });
      const word = plain.choices[0].text.trim().split(' ')[2];
      const cut = plain.choices[0].text.slice(0, plain.choices[0].text.indexOf(word));
      for (const stop of [word, ['zzz', word]]) {
        const res = await ask({ max_tokens: 30, stop });
        expect(res.choices[0]).toMatchObject({ text: cut, finish_reason: 'stop' });
      }
    });

    it('logit_bias forces or bans tokens', async () => {
      const prompt = tokenizer.encode(PROMPT);
      const plain = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, max_new_tokens: 3 });
      const banned = plain.body.token_ids[0];
      const without = await ask({ max_tokens: 3, logit_bias: { [banned]: -100 } });
      expect(without.choices[0].text).not.toBe(plain.body.text);
      const forced = 300;
      const only = await ask({ max_tokens: 3, logit_bias: { [forced]: 100 } });
      expect(only.choices[0].text).toBe(after(prompt, [forced, forced, forced]));
      const outside = await failure(ask({ logit_bias: { 99999: 1 } }));
      expect(outside).toMatchObject({ status: 400, param: 'logit_bias.99999' });
    });

    it('frequency and presence penalties steer greedy decoding away from repeats', async () => {
      const distinct = (c: OpenAI.Completion) => new Set(c.choices[0].logprobs!.tokens).size;
      const plain = await ask({ max_tokens: 40, logprobs: 1 });
      for (const penalty of [{ frequency_penalty: 2 }, { presence_penalty: 2 }]) {
        const res = await ask({ max_tokens: 40, logprobs: 1, ...penalty });
        expect(res.choices[0].text).not.toBe(plain.choices[0].text);
        expect(distinct(res)).toBeGreaterThan(distinct(plain));
      }
    });

    it('echo puts the prompt first', async () => {
      const plain = await ask({});
      const echoed = await ask({ echo: true });
      expect(echoed.choices[0].text).toBe(PROMPT + plain.choices[0].text);
    });

    it('what stays unsupported is refused by name; max_tokens past the context is refused', async () => {
      expect(await failure(ask({ suffix: 'The end.' }))).toMatchObject({
        status: 400,
        param: 'suffix',
        code: 'parameter_unsupported',
      });
      expect(await failure(ask({ best_of: 3 }))).toMatchObject({ status: 400, param: 'best_of', code: 'parameter_unsupported' });
      const tools = [{ type: 'function', function: { name: 'f', parameters: {} } }];
      expect(
        await failure(client.chat.completions.create({ model: base, messages: [{ role: 'user', content: 'hi' }], tools } as never)),
      ).toMatchObject({ status: 400, param: 'tools', code: 'parameter_unsupported' });
      expect(await failure(ask({ max_tokens: 600 }))).toMatchObject({ status: 400, code: 'max_tokens_over_context', param: 'max_tokens' });
      expect(await failure(ask({ n: 17 }))).toMatchObject({ status: 400, param: 'n', code: 'body_invalid' });
    });
  });

  describe('models', () => {
    it('lists the base model under its served name and interventions by name, the id beside', async () => {
      const models = await client.models.list();
      const [first, ...rest] = models.data as Array<OpenAI.Model & Record<string, unknown>>;
      expect(first).toMatchObject({ id: SERVED, object: 'model', parent: null, max_model_len: 512 });
      const shared = rest.find((m) => m.id === 'house-style')!;
      expect(shared).toMatchObject({ owned_by: 'shared', parent: SERVED, root: expect.stringMatching(/^iv_/) });
      const byName = await client.completions.create({ model: 'house-style', prompt: PROMPT, max_tokens: 4, temperature: 0 });
      const byId = await client.completions.create({ model: shared.root as string, prompt: PROMPT, max_tokens: 4, temperature: 0 });
      expect(byId.choices[0].text).toBe(byName.choices[0].text);
    });

    it('GET /v1/models/{id} gives one model: the base (its name has a slash), an intervention by name or id', async () => {
      expect(await client.models.retrieve(SERVED)).toMatchObject({ id: SERVED, object: 'model' });
      const shared = await client.models.retrieve('house-style');
      expect(shared).toMatchObject({ id: 'house-style', parent: SERVED });
      expect(await client.models.retrieve((shared as unknown as { root: string }).root)).toEqual(shared);
      expect((await json(api, 'GET', `/v1/models/${SERVED}`)).body.id).toBe(SERVED);
    });
  });

  describe("/tokenize and /detokenize (vLLM's shapes)", () => {
    it('a prompt, with and without special tokens, with token strings', async () => {
      const res = await json(api, 'POST', '/tokenize', { prompt: PROMPT, return_token_strs: true });
      expect(res.status).toBe(200);
      const ids = tokenizer.encode(PROMPT);
      expect(res.body).toEqual({ count: ids.length, max_model_len: 512, tokens: ids, token_strs: expect.any(Array) });
      expect(res.body.token_strs[0]).toBe('<s>');
      expect(res.body.token_strs.slice(1).join('').replaceAll('▁', ' ').trim()).toBe(PROMPT);
      const bare = await json(api, 'POST', '/tokenize', { prompt: PROMPT, add_special_tokens: false });
      expect(bare.body.tokens).toEqual(ids.slice(1));
      expect(bare.body.token_strs).toBeNull();
    });

    it('messages go through the chat template, as chat completions see them', async () => {
      const messages = [{ role: 'user', content: 'Tell me a story.' }];
      const res = await json(api, 'POST', '/tokenize', { model: base, messages });
      expect(res.status).toBe(200);
      expect(res.body.tokens).toEqual(tokenizer.encode('user: Tell me a story.\nassistant:', { addSpecialTokens: false }));
      const chat = await client.chat.completions.create({ model: base, messages: messages as never, max_tokens: 1 });
      expect(chat.usage!.prompt_tokens).toBe(res.body.count);
    });

    it('/detokenize gives the text back; bad ids and models are refused in the OpenAI shape', async () => {
      const ids = (await json(api, 'POST', '/tokenize', { prompt: PROMPT })).body.tokens;
      expect((await json(api, 'POST', '/detokenize', { tokens: ids })).body).toEqual({ prompt: PROMPT });
      const bad = await json(api, 'POST', '/detokenize', { tokens: [1, 99999] });
      expect(bad.status).toBe(400);
      expect(bad.body.error).toMatchObject({ param: 'tokens.1', code: 'token_out_of_vocabulary' });
      const unknown = await json(api, 'POST', '/tokenize', { model: 'nope', prompt: 'x' });
      expect(unknown.status).toBe(404);
      expect(unknown.body.error).toMatchObject({ param: 'model', code: 'model_not_found' });
      expect((await json(api, 'POST', '/tokenize', { model: 'house-style', prompt: 'x' })).status).toBe(200);
    });
  });

  describe('interventions and training jobs', () => {
    it('deleting a shared intervention is a 403 that says it is shared', async () => {
      const res = await json(api, 'DELETE', '/v1/interventions/house-style');
      expect(res.status).toBe(403);
      expect(res.body).toMatchObject({ code: 'intervention_shared', category: 'forbidden', field: 'id' });
      expect((await json(api, 'GET', '/v1/interventions/house-style')).status).toBe(200);
      expect((await json(api, 'DELETE', '/v1/interventions/no-such-thing')).status).toBe(404);
    });

    async function finished(id: string): Promise<any> {
      for (let i = 0; i < 600; i++) {
        const job = (await json(api, 'GET', `/v1/training/jobs/${id}`)).body;
        if (['succeeded', 'failed', 'cancelled'].includes(job.status)) return job;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`job ${id} did not finish`);
    }

    it('events say intervention_id throughout; cancelling a finished job is a 409; jobs list newest first', async () => {
      const recipe = {
        data: [{ prompt: 'Once upon a time', completion: ' a frog sang.' }],
        intervention: { kind: 'loreft', rank: 1, layers: [1], positions: 'l1' },
        hyperparameters: { epochs: 2, batch_size: 1 },
      };
      const first = (await json(api, 'POST', '/v1/training/jobs', { ...recipe, name: 'tiny' })).body;
      const done = await finished(first.id);
      expect(done.status).toBe('succeeded');
      const events = (await json(api, 'GET', `/v1/training/jobs/${first.id}/events?limit=1000`)).body.data;
      const final = events.filter((e: any) => e.type === 'status').at(-1);
      expect(final.data).toEqual({ status: 'succeeded', intervention_id: done.intervention_id });
      expect(JSON.stringify(events)).not.toContain('interventionId');
      const cancel = await json(api, 'POST', `/v1/training/jobs/${first.id}/cancel`);
      expect(cancel.status).toBe(409);
      expect(cancel.body).toMatchObject({ code: 'job_already_finished', category: 'conflict', field: 'id' });

      const second = (await json(api, 'POST', '/v1/training/jobs', { ...recipe, hyperparameters: { epochs: 5000, batch_size: 1 } })).body;
      const newest = await json(api, 'GET', '/v1/training/jobs?limit=1');
      expect(newest.body.data.map((j: any) => j.id)).toEqual([second.id]);
      expect(newest.body.has_more).toBe(true);
      const next = await json(api, 'GET', `/v1/training/jobs?limit=1&after=${second.id}`);
      expect(next.body.data.map((j: any) => j.id)).toEqual([first.id]);
      expect(next.body.has_more).toBe(false);
      expect((await json(api, 'POST', `/v1/training/jobs/${second.id}/cancel`)).status).toBe(200);
      expect((await finished(second.id)).status).toBe('cancelled');
    });
  });

  describe('metrics', () => {
    const scrape = async () => (await fetch(`${api.url}/metrics`)).text();
    const value = (text: string, name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);

    it('names without a doubled prefix', async () => {
      const text = await scrape();
      expect(text).toMatch(/^reft_process_cpu_seconds_total /m);
      expect(text).toMatch(/^reft_nodejs_heap_size_used_bytes /m);
      expect(text).not.toContain('reft_process_process_');
    });

    it('training jobs per status are counted at scrape time', async () => {
      const statuses = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
      const jobs = (text: string) =>
        Object.fromEntries(
          statuses.map((s) => [s, Number(new RegExp(`^reft_training_jobs\\{status="${s}"\\} (\\S+)$`, 'm').exec(text)?.[1])]),
        );
      const before = jobs(await scrape());
      for (const s of statuses) expect(before[s], s).toBeGreaterThanOrEqual(0);
      const job = await json(api, 'POST', '/v1/training/jobs', {
        data: [{ prompt: 'Once upon a time', completion: ' a frog sang.' }],
        hyperparameters: { epochs: 5000, batch_size: 1 },
      });
      expect(job.status).toBe(202);
      const busy = jobs(await scrape()); // queued, or already running
      expect(busy.queued + busy.running).toBe(before.queued + before.running + 1);
      expect((await json(api, 'POST', `/v1/training/jobs/${job.body.id}/cancel`)).status).toBe(200);
      for (let i = 0; i < 100 && (await json(api, 'GET', `/v1/training/jobs/${job.body.id}`)).body.status !== 'cancelled'; i++)
        await new Promise((r) => setTimeout(r, 100));
      expect(jobs(await scrape())).toEqual({ ...before, cancelled: before.cancelled + 1 });
    });

    it('engine gauges are current at scrape time', async () => {
      const idle = await scrape();
      expect(value(idle, 'reft_running_sequences')).toBe(0);
      expect(value(idle, 'reft_tokens_in_flight')).toBe(0);
      const controller = new AbortController();
      const res = await fetch(`${api.url}/v1/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: PROMPT, max_new_tokens: 400, ignore_eos: true, stream: true }),
        signal: controller.signal,
      });
      const reader = res.body!.getReader();
      await reader.read();
      const busy = await scrape(); // the first scrape after the change already shows it
      expect(value(busy, 'reft_running_sequences')).toBe(1);
      expect(value(busy, 'reft_tokens_in_flight')).toBe(tokenizer.encode(PROMPT).length + 400);
      expect(value(busy, 'reft_queue_depth')).toBe(0);
      controller.abort();
    });
  });
});

describe('API fidelity (server with API keys)', () => {
  const ADMIN = 'admin-secret-for-fidelity-0123456789abcdef';
  let server: ServerProcess;
  let admin: Api;
  let tenant: Api;

  beforeAll(async () => {
    server = await startServerProcess({ env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] });
    admin = { url: server.url, key: ADMIN };
    const created = await json(admin, 'POST', '/v1/admin/tenants', { name: 'alpha' });
    tenant = { url: server.url, key: (await json(admin, 'POST', `/v1/admin/tenants/${created.body.id}/keys`, {})).body.key };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  it('/docs and /openapi.json open without a key', async () => {
    const ui = await fetch(`${server.url}/docs`);
    expect(ui.status).toBe(200);
    expect(await ui.text()).toMatch(/swagger/i);
    const doc = await json({ url: server.url }, 'GET', '/openapi.json');
    expect(doc.status).toBe(200);
    expect(doc.body.openapi).toBe('3.1.0');
    expect(doc.body.paths).toHaveProperty(['/v1/generate']);
    expect((await json({ url: server.url }, 'GET', '/docs/json')).status).toBe(200);
  });

  it('an unknown route is a 404 for everyone', async () => {
    for (const key of [ADMIN, tenant.key, undefined, 'rft_wrong']) {
      const res = await json({ url: server.url, key }, 'GET', '/v1/nothing-here');
      expect(res.status, String(key)).toBe(404);
    }
  });

  it('a tenant route with the admin key says it needs a tenant key', async () => {
    const res = await json(admin, 'GET', '/v1/interventions');
    expect(res.status).toBe(403);
    expect(res.body).toMatchObject({ code: 'tenant_key_required', category: 'forbidden', field: 'authorization' });
    expect((await json(tenant, 'GET', '/v1/interventions')).status).toBe(200);
    expect((await json({ url: server.url, key: 'rft_wrong' }, 'GET', '/v1/interventions')).status).toBe(401);
  });
});

describe('CLI', () => {
  it('--version prints the package version', async () => {
    const r = await runCli(['--version']);
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(`${JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')).version}\n`);
  });

  it('generate ends its output with a newline (and prints nothing else)', async () => {
    const r = await runCli(['generate', '--model', STORIES, '--prompt', 'Once upon a time', '--max-new-tokens', '8']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^, there[^\n]*\n$/);
  });

  it('train --help shows the recipe defaults; import-pyreft says why it reads the model and defaults share_weights as training does', async () => {
    const train = (await runCli(['train', '--help'])).stdout.replace(/\s+/g, ' ');
    for (const shown of [
      '--rank <r> rank (default: 4)',
      '(default: "f3+l3")',
      '--epochs <n> epochs (default: 30)',
      '(default: 0.01)',
      '(default: "linear")',
      'share_weights=False) (default: false)',
    ])
      expect(train).toContain(shown);
    const imp = (await runCli(['import-pyreft', '--help'])).stdout.replace(/\s+/g, ' ');
    expect(imp).toContain("only its config.json is read, for what pyreft's files don't record");
    expect(imp).toContain('(default: false, as training)');
  });
});
