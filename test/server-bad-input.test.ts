import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, randomLoreft, type ArtifactFiles } from './support/artifacts.ts';
import { json, rawRequest, upload, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';
import { BACKENDS } from './support/databases.ts';

describe.each(BACKENDS)('on %s', (backend) => {
  let server: ServerProcess;
  let api: Api;
  const good = () => artifact([randomLoreft(1, 2)], { name: 'good' });

  beforeAll(async () => {
    server = await startServerProcess({ backend, args: ['--max-body-bytes', '65536', '--max-upload-bytes', '200000'] });
    api = { url: server.url };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  function expectProblem(res: { status: number; body: any; headers: Headers }, status: number, pattern: RegExp, field?: string) {
    expect(res.status, JSON.stringify(res.body)).toBe(status);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(res.body).toMatchObject({ status, type: expect.stringContaining('https://'), title: expect.any(String) });
    expect(res.body.detail).toMatch(pattern);
    expect(JSON.stringify(res.body)).not.toMatch(/at .*\.ts:\d+/); // no stack trace
    if (field) expect(res.body.field).toBe(field);
  }

  /** The OpenAI routes answer in OpenAI's error shape (issue 12). */
  function expectOpenAIError(res: { status: number; body: any; headers: Headers }, status: number, pattern: RegExp, param: string) {
    expect(res.status, JSON.stringify(res.body)).toBe(status);
    expect(res.headers.get('content-type')).toContain('application/json');
    expect(res.body.error.message).toMatch(pattern);
    expect(res.body.error.param).toBe(param);
  }

  function blobCount(): number {
    try {
      return readdirSync(join(server.dataDir, 'blobs'), { recursive: true }).length;
    } catch {
      return 0;
    }
  }

  async function stillHealthyAndEmpty() {
    expect((await json(api, 'GET', '/healthz')).status).toBe(200);
    expect((await json(api, 'GET', '/v1/interventions')).body.data).toEqual([]);
  }

  /** Rewrites a safetensors header. */
  function withHeader(weights: Uint8Array, edit: (h: Record<string, any>) => void, lengthOverride?: bigint): Uint8Array {
    const b = Buffer.from(weights);
    const n = Number(b.readBigUInt64LE(0));
    const header = JSON.parse(b.subarray(8, 8 + n).toString());
    edit(header);
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(lengthOverride ?? BigInt(json.length));
    return new Uint8Array(Buffer.concat([len, json, b.subarray(8 + n)]));
  }

  describe('JSON requests', () => {
    it('invalid JSON', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', '{"prompt": "x",'), 400, /not valid JSON/, 'body');
    });
    it('unknown fields', async () => {
      expectProblem(
        await json(api, 'POST', '/v1/generate', { prompt: 'x', temprature: 0.5 }),
        400,
        /unknown field "temprature"/,
        'temprature',
      );
    });
    it('mistyped fields', async () => {
      expectProblem(
        await json(api, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 'ten' }),
        400,
        /max_new_tokens/,
        'max_new_tokens',
      );
      expectProblem(await json(api, 'POST', '/v1/generate', { input_ids: [1, -3] }), 400, /input_ids/, 'input_ids.1');
    });
    it('out-of-range sampling values', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', temperature: -1 }), 400, /temperature/, 'temperature');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', top_p: 0 }), 400, /top_p/, 'top_p');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', top_k: -2 }), 400, /top_k/, 'top_k');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 0 }), 400, /max_new_tokens/, 'max_new_tokens');
      expectOpenAIError(await json(api, 'POST', '/v1/completions', { model: 'x', prompt: 'x', n: 17 }), 400, /n/, 'n');
    });
    it('neither or several prompt inputs', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { max_new_tokens: 3 }), 400, /one of prompt, messages or input_ids/);
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', input_ids: [1] }), 400, /only one of/);
    });
    it('a token id outside the vocabulary', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { input_ids: [1, 99999] }), 400, /outside the vocabulary/, 'input_ids.1');
    });
    it('a body over the limit', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x'.repeat(70_000) }), 413, /too large/);
    });
    it('a prompt over the context length', async () => {
      expectProblem(
        await json(api, 'POST', '/v1/generate', { input_ids: Array.from({ length: 600 }, (_, i) => 3 + (i % 400)) }),
        400,
        /600 tokens; the model's context is 512/,
        'prompt',
      );
    });
    it('an unknown adapter', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { adapter: 'nope', prompt: 'x' }), 404, /no intervention "nope"/, 'adapter');
      expectOpenAIError(await json(api, 'POST', '/v1/completions', { model: 'nope', prompt: 'x' }), 404, /no intervention "nope"/, 'model');
    });
    it('a path-traversal id', async () => {
      expectProblem(await json(api, 'GET', '/v1/interventions/..%2F..%2Fetc%2Fpasswd'), 400, /id/);
      expectProblem(await json(api, 'GET', '/v1/interventions/a..b/files/reft_config.json'), 400, /\.\./);
      expectProblem(await json(api, 'GET', '/v1/interventions/iv_x/files/..%2Freft.db'), 400, /file/);
      expectProblem(await rawRequest(api, 'DELETE', '/v1/interventions/..'), 400, /id/);
      expectProblem(await rawRequest(api, 'GET', '/v1/interventions/../../etc/passwd'), 404, /no route/);
    });
    it('unknown routes', async () => {
      expectProblem(await json(api, 'GET', '/v1/nothing'), 404, /no route/);
    });
  });

  describe('intervention uploads: refused with the field or tensor named, nothing stored', () => {
    const cases: Array<[string, () => Partial<ArtifactFiles>, Record<string, string>, number, RegExp, string?]> = [
      ['missing weights part', () => ({ config: good().config }), {}, 400, /missing part "weights"/, 'weights'],
      ['config that is not JSON', () => ({ ...good(), config: '{nope' }), {}, 400, /not valid JSON/, 'reft_config.json'],
      [
        'unknown config field',
        () => ({ ...good(), config: JSON.stringify({ ...JSON.parse(good().config), extra: 1 }) }),
        {},
        400,
        /extra/,
        'reft_config.json.extra',
      ],
      [
        'wrong hidden size',
        () => artifact([randomLoreft(1, 2, 4, 'l1', 32)], {}, { hidden_size: 32, num_hidden_layers: 5 }),
        {},
        400,
        /hidden_size is 32/,
        'reft_config.json.base_model.hidden_size',
      ],
      [
        'layer out of range',
        () => artifact([randomLoreft(1, 7)]),
        {},
        400,
        /layer 7 is out of range/,
        'reft_config.json.interventions.0.layer',
      ],
      ['truncated safetensors', () => ({ ...good(), weights: good().weights.subarray(0, 300) }), {}, 400, /runs past the end/],
      [
        'a huge header length',
        () => ({ ...good(), weights: withHeader(good().weights, () => {}, 2n ** 62n) }),
        {},
        400,
        /header length .* exceeds/,
      ],
      [
        'a header that lies about offsets',
        () => ({ ...good(), weights: withHeader(good().weights, (h) => (h['interventions.0.rotate'].data_offsets = [0, 10_000_000])) }),
        {},
        400,
        /interventions\.0\.rotate/,
        'interventions.0.rotate',
      ],
      [
        'overlapping tensors',
        () => ({ ...good(), weights: withHeader(good().weights, (h) => (h['interventions.0.source.bias'].data_offsets = [0, 16])) }),
        {},
        400,
        /overlap/,
      ],
      [
        'an extra tensor',
        () => ({
          ...good(),
          weights: artifact([{ ...randomLoreft(1, 2), tensors: { ...randomLoreft(1, 2).tensors, 'proj.weight': new Float32Array(256) } }])
            .weights,
        }),
        {},
        400,
        /unexpected tensor interventions\.0\.proj\.weight/,
        'interventions.0.proj.weight',
      ],
      [
        'a missing tensor',
        () => {
          const iv = randomLoreft(1, 2);
          delete iv.tensors['source.bias'];
          return artifact([iv]);
        },
        {},
        400,
        /missing tensor interventions\.0\.source\.bias/,
        'interventions.0.source.bias',
      ],
      [
        'a wrong shape',
        () => ({ config: good().config, weights: artifact([randomLoreft(1, 2, 3)]).weights }),
        {},
        400,
        /interventions\.0\.rotate has shape \[3,64\], expected \[4,64\]/,
        'interventions.0.rotate',
      ],
      [
        'NaN values',
        () => {
          const iv = randomLoreft(1, 2);
          iv.tensors['source.weight'][5] = NaN;
          return artifact([iv]);
        },
        {},
        400,
        /non-finite value at index 5/,
        'interventions.0.source.weight',
      ],
      [
        'Inf values',
        () => {
          const iv = randomLoreft(1, 2);
          iv.tensors['source.bias'][0] = Infinity;
          return artifact([iv]);
        },
        {},
        400,
        /non-finite/,
        'interventions.0.source.bias',
      ],
      [
        'non-orthonormal R',
        () => {
          const iv = randomLoreft(1, 2);
          iv.tensors.rotate[0] *= 1.5;
          return artifact([iv]);
        },
        {},
        400,
        /not orthonormal/,
        'interventions.0.rotate',
      ],
      [
        'a bad position spec',
        () => artifact([randomLoreft(1, 2, 4, 'x3')]),
        {},
        400,
        /not a position spec/,
        'reft_config.json.interventions.0.positions',
      ],
      ['a path-traversal name', () => good(), { name: '../../etc/passwd' }, 400, /name/, 'name'],
      ['an unknown part', () => good(), { colour: 'red' }, 400, /unknown part "colour"/, 'colour'],
      ['a file over the upload limit', () => ({ config: good().config, weights: new Uint8Array(300_000) }), {}, 413, /too large/],
    ];
    for (const [name, files, fields, status, pattern, field] of cases) {
      it(name, async () => {
        const before = blobCount();
        expectProblem(await upload(api, files(), fields), status, pattern, field);
        expect(blobCount()).toBe(before);
        await stillHealthyAndEmpty();
      });
    }

    it('a JSON body where multipart is expected', async () => {
      expectProblem(await json(api, 'POST', '/v1/interventions', { config: 1 }), 415, /multipart/);
    });
  });
});
