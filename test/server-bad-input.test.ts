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

  /** A problem+json answer carrying the catalogue entry `code` (with its status and type). */
  function expectProblem(res: { status: number; body: any; headers: Headers }, status: number, code: string, field?: string) {
    expect(res.status, JSON.stringify(res.body)).toBe(status);
    expect(res.headers.get('content-type')).toContain('application/problem+json');
    expect(res.body).toMatchObject({ status, code, type: `/problems/${code}`, title: expect.any(String), category: expect.any(String) });
    expect(res.body.detail).toEqual(expect.any(String));
    expect(JSON.stringify(res.body)).not.toMatch(/at .*\.ts:\d+/); // no stack trace
    if (field) expect(res.body.field).toBe(field);
  }

  /** The OpenAI routes answer in OpenAI's error shape (issue 12). */
  function expectOpenAIError(res: { status: number; body: any; headers: Headers }, status: number, code: string, param: string) {
    expect(res.status, JSON.stringify(res.body)).toBe(status);
    expect(res.headers.get('content-type')).toContain('application/json');
    expect(res.body.error.code).toBe(code);
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
      expectProblem(await json(api, 'POST', '/v1/generate', '{"prompt": "x",'), 400, 'body_not_json', 'body');
    });
    it('unknown fields', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', temprature: 0.5 }), 400, 'body_invalid', 'temprature');
    });
    it('mistyped fields', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 'ten' }), 400, 'body_invalid', 'max_new_tokens');
      expectProblem(await json(api, 'POST', '/v1/generate', { input_ids: [1, -3] }), 400, 'body_invalid', 'input_ids.1');
    });
    it('out-of-range sampling values', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', temperature: -1 }), 400, 'body_invalid', 'temperature');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', top_p: 0 }), 400, 'body_invalid', 'top_p');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', top_k: -2 }), 400, 'body_invalid', 'top_k');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', max_new_tokens: 0 }), 400, 'body_invalid', 'max_new_tokens');
      expectOpenAIError(await json(api, 'POST', '/v1/completions', { model: 'x', prompt: 'x', n: 17 }), 400, 'body_invalid', 'n');
    });
    it('neither or several prompt inputs', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { max_new_tokens: 3 }), 400, 'prompt_input_ambiguous');
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x', input_ids: [1] }), 400, 'prompt_input_ambiguous');
    });
    it('a token id outside the vocabulary', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { input_ids: [1, 99999] }), 400, 'token_out_of_vocabulary', 'input_ids.1');
    });
    it('a body over the limit', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { prompt: 'x'.repeat(70_000) }), 413, 'body_too_large');
    });
    it('a prompt over the context length', async () => {
      expectProblem(
        await json(api, 'POST', '/v1/generate', { input_ids: Array.from({ length: 600 }, (_, i) => 3 + (i % 400)) }),
        400,
        'prompt_too_long',
        'prompt',
      );
    });
    it('an unknown adapter', async () => {
      expectProblem(await json(api, 'POST', '/v1/generate', { adapter: 'nope', prompt: 'x' }), 404, 'intervention_not_found', 'adapter');
      expectOpenAIError(await json(api, 'POST', '/v1/completions', { model: 'nope', prompt: 'x' }), 404, 'model_not_found', 'model');
    });
    it('a path-traversal id', async () => {
      expectProblem(await json(api, 'GET', '/v1/interventions/..%2F..%2Fetc%2Fpasswd'), 400, 'body_invalid');
      expectProblem(await json(api, 'GET', '/v1/interventions/a..b/files/reft_config.json'), 400, 'body_invalid');
      expectProblem(await json(api, 'GET', '/v1/interventions/iv_x/files/..%2Freft.db'), 400, 'body_invalid');
      expectProblem(await rawRequest(api, 'DELETE', '/v1/interventions/..'), 400, 'body_invalid');
      expectProblem(await rawRequest(api, 'GET', '/v1/interventions/../../etc/passwd'), 404, 'route_not_found');
    });
    it('unknown routes', async () => {
      expectProblem(await json(api, 'GET', '/v1/nothing'), 404, 'route_not_found');
    });
  });

  describe('intervention uploads: refused with the field or tensor named, nothing stored', () => {
    const cases: Array<[string, () => Partial<ArtifactFiles>, Record<string, string>, number, string, string?]> = [
      ['missing weights part', () => ({ config: good().config }), {}, 400, 'multipart_part_missing', 'weights'],
      ['config that is not JSON', () => ({ ...good(), config: '{nope' }), {}, 400, 'artifact_config_not_json', 'reft_config.json'],
      [
        'unknown config field',
        () => ({ ...good(), config: JSON.stringify({ ...JSON.parse(good().config), extra: 1 }) }),
        {},
        400,
        'artifact_config_invalid',
        'reft_config.json.extra',
      ],
      [
        'wrong hidden size',
        () => artifact([randomLoreft(1, 2, 4, 'l1', 32)], {}, { hidden_size: 32, num_hidden_layers: 5 }),
        {},
        400,
        'artifact_model_mismatch',
        'reft_config.json.base_model.hidden_size',
      ],
      [
        'layer out of range',
        () => artifact([randomLoreft(1, 7)]),
        {},
        400,
        'intervention_layer_out_of_range',
        'reft_config.json.interventions.0.layer',
      ],
      ['truncated safetensors', () => ({ ...good(), weights: good().weights.subarray(0, 300) }), {}, 400, 'artifact_weights_invalid'],
      [
        'a huge header length',
        () => ({ ...good(), weights: withHeader(good().weights, () => {}, 2n ** 62n) }),
        {},
        400,
        'artifact_weights_invalid',
      ],
      [
        'a header that lies about offsets',
        () => ({ ...good(), weights: withHeader(good().weights, (h) => (h['interventions.0.rotate'].data_offsets = [0, 10_000_000])) }),
        {},
        400,
        'artifact_weights_invalid',
        'interventions.0.rotate',
      ],
      [
        'overlapping tensors',
        () => ({ ...good(), weights: withHeader(good().weights, (h) => (h['interventions.0.source.bias'].data_offsets = [0, 16])) }),
        {},
        400,
        'artifact_weights_invalid',
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
        'artifact_tensor_unexpected',
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
        'artifact_tensor_missing',
        'interventions.0.source.bias',
      ],
      [
        'a wrong shape',
        () => ({ config: good().config, weights: artifact([randomLoreft(1, 2, 3)]).weights }),
        {},
        400,
        'artifact_tensor_shape',
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
        'artifact_tensor_non_finite',
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
        'artifact_tensor_non_finite',
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
        'artifact_rotation_not_orthonormal',
        'interventions.0.rotate',
      ],
      [
        'a bad position spec',
        () => artifact([randomLoreft(1, 2, 4, 'x3')]),
        {},
        400,
        'positions_invalid',
        'reft_config.json.interventions.0.positions',
      ],
      ['a path-traversal name', () => good(), { name: '../../etc/passwd' }, 400, 'name_invalid', 'name'],
      ['an unknown part', () => good(), { colour: 'red' }, 400, 'multipart_part_unknown', 'colour'],
      [
        'a file over the upload limit',
        () => ({ config: good().config, weights: new Uint8Array(300_000) }),
        {},
        413,
        'multipart_part_too_large',
      ],
    ];
    for (const [name, files, fields, status, code, field] of cases) {
      it(name, async () => {
        const before = blobCount();
        expectProblem(await upload(api, files(), fields), status, code, field);
        expect(blobCount()).toBe(before);
        await stillHealthyAndEmpty();
      });
    }

    it('a JSON body where multipart is expected', async () => {
      expectProblem(await json(api, 'POST', '/v1/interventions', { config: 1 }), 415, 'multipart_expected');
    });
  });
});
