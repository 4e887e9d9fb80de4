import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../src/model/load.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { STORIES } from './support/fixtures.ts';
import { STEER, appliedError, steerCases, type SteerCase } from './support/steer.ts';
import { json, sse, upload, type Api } from './support/http.ts';
import { runCli, startServerProcess, type ServerProcess } from './support/server.ts';

/** Issue 16: request-time control (REFT.md "Request-time control") over real HTTP, on fixtures/steer. */
const CASES = steerCases;
const ARTIFACTS = ['alpha', 'beta', 'gamma'];
const artifactDir = (name: string) => join(STEER, 'artifacts', name);
const artifactFiles = (name: string) => ({
  config: readFileSync(join(artifactDir(name), 'reft_config.json'), 'utf8'),
  weights: new Uint8Array(readFileSync(join(artifactDir(name), 'reft_weights.safetensors'))),
});

/** The body that runs a case: its list, its prompt, 20 greedy steps, top-5 and the readout. */
const caseBody = (c: SteerCase) => ({
  interventions: c.request,
  input_ids: c.input_ids,
  max_new_tokens: c.greedy_ids.length,
  ignore_eos: true,
  top_logprobs: 5,
  return_coefficients: true,
});

function expectApplied(actual: SteerCase['applied'], expected: SteerCase['applied'], name: string): void {
  expect(appliedError(actual, expected), `${name}: largest coefficient difference`).toBeLessThan(1e-4);
}

/** A /v1/generate response checked against its case: greedy ids, top-5 at the last prompt position, coefficients. */
function expectCase(body: any, c: SteerCase): void {
  expect(body.token_ids, c.name).toEqual(c.greedy_ids);
  expect(
    body.logprobs[0].top_logprobs.map((t: { token_id: number }) => t.token_id),
    `${c.name} top-5`,
  ).toEqual(c.last_logits_top5);
  expectApplied(body.applied, c.applied, c.name);
  expect(body.prompt_token_texts).toHaveLength(c.input_ids.length);
}

describe('request-time control over HTTP', () => {
  const ADMIN = 'admin-secret-for-tests-0123456789abcdef';
  let server: ServerProcess;
  let a: Api;
  let b: Api;
  let tokenizer: TextTokenizer;
  const ids: Record<string, string> = {};

  beforeAll(async () => {
    server = await startServerProcess({ env: { REFT_ADMIN_KEY: ADMIN }, args: ['--tenant-max-concurrent', '64'] });
    const admin = { url: server.url, key: ADMIN };
    const key = async (name: string) => {
      const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name });
      return (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body.key as string;
    };
    a = { url: server.url, key: await key('a') };
    b = { url: server.url, key: await key('b') };
    for (const name of ARTIFACTS) {
      const res = await upload(a, artifactFiles(name));
      expect(res.status, JSON.stringify(res.body)).toBe(201);
      ids[name] = res.body.id;
    }
    tokenizer = (await loadModel(STORIES)).tokenizer;
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  it('every reference case: greedy ids, top-5 at the last prompt position, coefficients', async () => {
    for (const c of CASES) {
      const res = await json(a, 'POST', '/v1/generate', caseBody(c));
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expectCase(res.body, c);
      expect(res.body.adapter).toBeNull();
    }
  });

  it('all cases in one batch, beside a plain row and an `adapter` row, each as alone', async () => {
    const plain = { input_ids: CASES[0].input_ids, max_new_tokens: 20, ignore_eos: true, top_logprobs: 5 };
    const adapter = { ...plain, adapter: 'beta', input_ids: CASES[6].input_ids };
    const alone = [await json(a, 'POST', '/v1/generate', plain), await json(a, 'POST', '/v1/generate', adapter)];
    const together = await Promise.all([
      ...CASES.map((c) => json(a, 'POST', '/v1/generate', caseBody(c))),
      json(a, 'POST', '/v1/generate', plain),
      json(a, 'POST', '/v1/generate', adapter),
    ]);
    CASES.forEach((c, i) => expectCase(together[i].body, c));
    expect(together[CASES.length].body.logprobs).toEqual(alone[0].body.logprobs);
    expect(together[CASES.length + 1].body.logprobs).toEqual(alone[1].body.logprobs);
    // the adapter row is steered: it differs from the plain model on its prompt
    expect(together[CASES.length + 1].body.token_ids).not.toEqual(
      (await json(a, 'POST', '/v1/generate', { ...adapter, adapter: undefined })).body.token_ids,
    );
  });

  it('strength 0 is the base model exactly; strength 1 is the stored artifact alone exactly', async () => {
    const prompt = { prompt: 'Once upon a time', max_new_tokens: 24, ignore_eos: true, top_logprobs: 3 };
    const base = await json(a, 'POST', '/v1/generate', prompt);
    const zero = await json(a, 'POST', '/v1/generate', {
      ...prompt,
      interventions: ARTIFACTS.map((intervention) => ({ intervention, strength: 0 })),
    });
    expect(zero.body.token_ids).toEqual(base.body.token_ids);
    expect(zero.body.logprobs).toEqual(base.body.logprobs);
    for (const name of ARTIFACTS) {
      const stored = await json(a, 'POST', '/v1/generate', { ...prompt, adapter: name });
      const one = await json(a, 'POST', '/v1/generate', { ...prompt, interventions: [{ intervention: name, strength: 1 }] });
      expect(one.body.token_ids, name).toEqual(stored.body.token_ids);
      expect(one.body.logprobs, name).toEqual(stored.body.logprobs);
      expect(one.body.logprobs, `${name} steers`).not.toEqual(base.body.logprobs);
    }
  });

  it('a stream sends `applied` once, as its own event before the first token', async () => {
    const c = CASES[7];
    const res = await fetch(`${a.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${a.key}` },
      body: JSON.stringify({ ...caseBody(c), stream: true }),
    });
    const events = (await sse(res)) as Array<Record<string, any>>;
    expect(events[0].type).toBe('applied');
    expectApplied(events[0].applied, c.applied, c.name);
    expect(events[0].prompt_token_texts).toHaveLength(c.input_ids.length);
    expect(events.filter((e) => e.type === 'applied')).toHaveLength(1);
    expect(events.filter((e) => e.type === 'token').map((e) => e.token_id)).toEqual(c.greedy_ids);
  });

  it('the official openai client sends the list as an extra body field and reads `applied` on each choice', async () => {
    const client = new OpenAI({ baseURL: `${a.url}/v1`, apiKey: a.key });
    for (const c of [CASES[7], CASES[8]]) {
      const completion = await client.completions.create({
        model: STORIES,
        prompt: c.input_ids,
        max_tokens: c.greedy_ids.length,
        temperature: 0,
        // extensions go in the body as-is (Python's extra_body); the client doesn't know their types
        ...({ interventions: c.request, return_coefficients: true, ignore_eos: true } as object),
      });
      const choice = completion.choices[0] as OpenAI.CompletionChoice & { applied: SteerCase['applied'] };
      expect(choice.text, c.name).toBe(tokenizer.decode([...c.input_ids, ...c.greedy_ids]).slice(tokenizer.decode(c.input_ids).length));
      expectApplied(choice.applied, c.applied, c.name);
    }
    const stream = await client.completions.create({
      model: STORIES,
      prompt: CASES[5].input_ids,
      max_tokens: 20,
      temperature: 0,
      stream: true,
      ...({ interventions: CASES[5].request, return_coefficients: true, ignore_eos: true } as object),
    });
    const chunks: Array<OpenAI.CompletionChoice & { applied?: SteerCase['applied'] }> = [];
    for await (const chunk of stream as unknown as AsyncIterable<OpenAI.Completion>) chunks.push(...(chunk.choices as typeof chunks));
    expectApplied(chunks[0].applied!, CASES[5].applied, 'stream');
    expect(chunks.filter((ch) => ch.applied)).toHaveLength(1);
  });

  describe('saved compositions', () => {
    const mix = CASES[7];
    let mixId: string;

    it('creates, lists, fetches and uses one wherever an intervention name goes', async () => {
      const created = await json(a, 'POST', '/v1/compositions', { name: 'mix', interventions: mix.request });
      expect(created.status, JSON.stringify(created.body)).toBe(201);
      mixId = created.body.id;
      expect(created.body).toMatchObject({
        object: 'composition',
        name: 'mix',
        interventions: mix.request.map((it) => ({ ...it, intervention: ids[it.intervention] })),
      });
      expect((await json(a, 'GET', '/v1/compositions/mix')).body).toEqual(created.body);
      const list = await json(a, 'GET', '/v1/compositions');
      expect(list.body.data.map((c: { id: string }) => c.id)).toEqual([mixId]);

      const { interventions: _, ...rest } = caseBody(mix);
      for (const adapter of ['mix', mixId]) {
        const used = await json(a, 'POST', '/v1/generate', { ...rest, adapter });
        expect(used.status, JSON.stringify(used.body)).toBe(200);
        expectCase(used.body, mix);
        expect(used.body.adapter).toBe(mixId);
      }
      const client = new OpenAI({ baseURL: `${a.url}/v1`, apiKey: a.key });
      const completion = await client.completions.create({
        model: 'mix',
        prompt: mix.input_ids,
        max_tokens: 20,
        temperature: 0,
        ...({ ignore_eos: true } as object),
      });
      expect(completion.choices[0].text).toBe(
        tokenizer.decode([...mix.input_ids, ...mix.greedy_ids]).slice(tokenizer.decode(mix.input_ids).length),
      );
      expect((await json(a, 'GET', '/v1/models/mix')).body).toMatchObject({ id: 'mix', root: mixId });
    });

    it('replaces one only when asked; a name taken by an intervention, or a nested composition, is refused', async () => {
      const other = CASES[6];
      const taken = await json(a, 'POST', '/v1/compositions', { name: 'mix', interventions: other.request });
      expect(taken.status).toBe(409);
      expect(taken.body).toMatchObject({ code: 'composition_name_taken', field: 'name' });
      const replaced = await json(a, 'POST', '/v1/compositions', { name: 'mix', interventions: other.request, replace: true });
      expect(replaced.status).toBe(200);
      expect(replaced.body.id).toBe(mixId);
      const used = await json(a, 'POST', '/v1/generate', { ...caseBody(other), interventions: undefined, adapter: 'mix' });
      expectCase(used.body, other);

      // names are shared with interventions both ways: a request naming one must find one thing
      const shadow = await json(a, 'POST', '/v1/compositions', { name: 'alpha', interventions: other.request });
      expect(shadow.body).toMatchObject({ status: 409, code: 'intervention_name_taken', field: 'name' });
      const shadowed = await upload(a, artifactFiles('gamma'), { name: 'mix' });
      expect(shadowed.body).toMatchObject({ status: 409, code: 'intervention_name_taken', field: 'name' });
      const nested = await json(a, 'POST', '/v1/compositions', { name: 'outer', interventions: [{ intervention: 'mix' }] });
      expect(nested.status).toBe(400);
      expect(nested.body).toMatchObject({ code: 'composition_nested', field: 'interventions.0.intervention' });
      const inRequest = await json(a, 'POST', '/v1/generate', {
        prompt: 'Hi',
        interventions: [{ intervention: 'beta' }, { intervention: mixId }],
      });
      expect(inRequest.body).toMatchObject({ status: 400, code: 'composition_nested', field: 'interventions.1.intervention' });
    });

    it("is tenant-scoped: another tenant gets 404 for it and can't use it", async () => {
      expect((await json(b, 'GET', `/v1/compositions/${mixId}`)).status).toBe(404);
      expect((await json(b, 'GET', '/v1/compositions')).body.data).toEqual([]);
      const use = await json(b, 'POST', '/v1/generate', { prompt: 'Hi', adapter: mixId });
      expect(use.status).toBe(404);
      expect(use.body.field).toBe('adapter');
      expect((await json(b, 'DELETE', `/v1/compositions/${mixId}`)).status).toBe(404);
    });

    it('an artifact a composition uses cannot be deleted (409 naming it) until the composition is', async () => {
      const refused = await json(a, 'DELETE', `/v1/interventions/${ids.beta}`);
      expect(refused.status).toBe(409);
      expect(refused.body.detail).toContain('mix');
      expect((await json(a, 'DELETE', '/v1/compositions/mix')).status).toBe(204);
      expect((await json(a, 'GET', `/v1/compositions/${mixId}`)).status).toBe(404);
      expect((await json(a, 'DELETE', `/v1/interventions/${ids.beta}`)).status).toBe(204);
      const res = await upload(a, artifactFiles('beta'));
      expect(res.status).toBe(201);
      ids.beta = res.body.id;
    });
  });

  it('refuses bad lists with a 400 (404 for an unknown artifact) naming the field', async () => {
    const post = (body: object) => json(a, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 2, ...body });
    const refused: Array<[object | string, number, string]> = [
      [{ interventions: [{ intervention: 'alpha' }, { intervention: 'nope' }] }, 404, 'interventions.1.intervention'],
      [{ interventions: [{ intervention: 'beta' }, { intervention: 'alpha', layers: [1, 2] }] }, 400, 'interventions.1.layers'],
      [{ interventions: [{ intervention: 'alpha', layers: [] }] }, 400, 'interventions.0.layers'],
      [{ interventions: [{ intervention: 'alpha', strength: null }] }, 400, 'interventions.0.strength'], // NaN as JSON writes it
      [{ interventions: [{ intervention: 'alpha', strength: 10.5 }] }, 400, 'interventions.0.strength'],
      [{ interventions: [{ intervention: 'alpha', strength: -11 }] }, 400, 'interventions.0.strength'],
      ['{"prompt":"Hi","interventions":[{"intervention":"alpha","strength":1e400}]}', 400, 'interventions.0.strength'],
      [{ interventions: Array.from({ length: 9 }, () => ({ intervention: 'alpha' })) }, 400, 'interventions'],
      [{ interventions: [{ intervention: 'alpha', positions: 'x3' }] }, 400, 'interventions.0.positions'],
      [{ interventions: [{ intervention: 'alpha', positions: 'f0' }] }, 400, 'interventions.0.positions'],
      [{ interventions: [{ intervention: 'alpha', scale: 2 }] }, 400, 'interventions.0.scale'],
      [{ adapter: 'alpha', interventions: [{ intervention: 'beta' }] }, 400, 'interventions'],
    ];
    for (const [body, status, field] of refused) {
      const res = typeof body === 'string' ? await json(a, 'POST', '/v1/generate', body) : await post(body);
      expect([res.status, res.body.field], JSON.stringify(body)).toEqual([status, field]);
    }
    const openai = await json(a, 'POST', '/v1/completions', { model: 'alpha', prompt: 'Hi', interventions: [{ intervention: 'beta' }] });
    expect(openai.status).toBe(400);
    expect(openai.body.error).toMatchObject({ code: 'interventions_with_adapter', param: 'interventions' });
  });

  it('the CLI applies several --intervention DIR[:strength] with per-intervention --layers/--positions, as the server does', async () => {
    const prompt = 'Once upon a time';
    const server = await json(a, 'POST', '/v1/generate', {
      prompt,
      max_new_tokens: 16,
      interventions: [
        { intervention: 'alpha', strength: 0.7, layers: [3] },
        { intervention: 'gamma', strength: 1.5, positions: 'f3' },
      ],
    });
    const args = ['generate', '--model', STORIES, '--prompt', prompt, '--max-new-tokens', '16'];
    const steered = [
      ...['--intervention', `${artifactDir('alpha')}:0.7`, '--layers', '3'],
      ...['--intervention', `${artifactDir('gamma')}:1.5`, '--positions', 'f3'],
    ];
    // two processes at once: each spends its time loading
    const [cli, bad] = await Promise.all([
      runCli([...args, ...steered]),
      runCli([...args, '--intervention', artifactDir('alpha'), '--layers', '2']),
    ]);
    expect(cli.stderr).toBe('');
    expect(cli.stdout).toBe(`${server.body.text}\n`);
    const base = await json(a, 'POST', '/v1/generate', { prompt, max_new_tokens: 16 });
    expect(server.body.text, 'the list steers').not.toBe(base.body.text);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--layers of .*alpha: layer 2 is not one of the artifact's layers \(1, 3\)/);
  }, 120_000);
});
