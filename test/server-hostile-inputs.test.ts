import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifact, randomLoreft } from './support/artifacts.ts';
import { SHARED } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { expectHealthzResponsive, expectProblem, stillGenerates, whileProbing } from './support/probe.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';
import { pickleBytes, stateDictOfViews, torchZip } from './support/torch-save.ts';

/**
 * Issue 11, findings 1, 2, 6 and the smaller ones, scaled down: each hostile input is refused
 * with a 4xx naming the limit it broke, before the work it would cause, while /healthz keeps
 * answering, the server's memory stays flat, and the server generates afterwards.
 */
const PYREFT = join(SHARED, 'fixtures', 'pyreft');
const FOLDER = 'loreft_bf16';
const UPLOAD_LIMIT = 4 * 1024 * 1024;

let server: ServerProcess;
let api: Api;

beforeAll(async () => {
  server = await startServerProcess({ args: ['--max-upload-bytes', String(UPLOAD_LIMIT)] });
  api = { url: server.url };
});
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

/** pyreft's loreft_bf16 import with its first intkey file replaced by `bytes`. */
function pyreftForm(bytes: Uint8Array): FormData {
  const dir = join(PYREFT, FOLDER);
  const names = readdirSync(dir)
    .filter((n) => n.startsWith('intkey_'))
    .sort();
  const form = new FormData();
  form.append('config', new Blob([readFileSync(join(dir, 'config.json'))]), 'config.json');
  for (const name of names) form.append('files', new Blob([name === names[0] ? bytes : readFileSync(join(dir, name))]), name);
  form.append('positions', 'f1+l1');
  form.append('share_weights', 'true');
  return form;
}

async function post(path: string, body: FormData | string, type?: string) {
  const res = await fetch(api.url + path, { method: 'POST', body, headers: type ? { 'content-type': type } : {} });
  return { status: res.status, body: (await res.json()) as any, headers: res.headers };
}

/** Sends a hostile request while probing; asserts the answer, healthz, memory, and generation after. */
async function refusedQuietly(
  send: () => Promise<{ status: number; body: any; headers: Headers }>,
  status: number,
  code: string,
  maxRssGrowthMb = 150,
) {
  const probe = await whileProbing(api, server.proc.pid!, send);
  expectProblem(probe.result, status, code);
  expectHealthzResponsive(probe);
  expect(probe.rssGrowthMb).toBeLessThan(maxRssGrowthMb);
  await stillGenerates(api);
  return probe;
}

describe('finding 1: pyreft pickles are bounded in opcodes, marks (all frames), bytes', () => {
  it('nested (] pairs are refused at the mark limit', async () => {
    const n = 100_000;
    const pkl = pickleBytes([0x80, 2], Buffer.alloc(2 * n, Buffer.from('(]', 'latin1')), Buffer.alloc(n, 'e'), [0x2e]);
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(torchZip({ 'data.pkl': pkl }))),
      400,
      'pyreft_pickle_refused',
    );
  });

  it('a flood of bare MARKs larger than the intkey part limit is refused as it streams in', async () => {
    const pkl = pickleBytes([0x80, 2], Buffer.alloc(3 * 1024 * 1024, '('), [0x2e]);
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(torchZip({ 'data.pkl': pkl }))),
      413,
      'multipart_part_too_large',
    );
  });

  it('a flood of bare MARKs larger than the pickle byte limit is refused before it is read', async () => {
    const pkl = pickleBytes([0x80, 2], Buffer.alloc(1024 * 1024 + 10, '('), [0x2e]);
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(torchZip({ 'data.pkl': pkl }))),
      400,
      'pyreft_pickle_too_large',
    );
  });

  it('a long run of opcodes is refused at the opcode limit', async () => {
    const pkl = pickleBytes([0x80, 2], [0x4e], Buffer.alloc(2 * 60_000, Buffer.from('q\x00', 'latin1')), [0x2e]); // NONE, BINPUT 0 ...
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(torchZip({ 'data.pkl': pkl }))),
      400,
      'pyreft_pickle_refused',
    );
  });
});

describe('finding 2: tensor views cannot allocate more than the model could need', () => {
  it('four stride-0 views of 2^26 elements over one 4-byte storage are refused by the element budget', async () => {
    const views = [0, 1, 2, 3].map((i) => ({ name: `w${i}`, size: [2 ** 26], stride: [0] }));
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(stateDictOfViews(views, 1))),
      400,
      'pyreft_pickle_refused',
    );
  });

  it('a view larger than its storage is refused', async () => {
    const views = [{ name: 'weight', size: [4, 64], stride: [0, 0] }];
    await refusedQuietly(
      () => post('/v1/interventions/import/pyreft', pyreftForm(stateDictOfViews(views, 1))),
      400,
      'pyreft_tensor_invalid',
    );
  });
});

describe('safetensors headers and JSON nesting', () => {
  it('a weights header with more entries than an artifact can have is refused before parsing', async () => {
    const entries: Record<string, unknown> = {};
    for (let i = 0; i < 6000; i++) entries[`t${i}`] = { dtype: 'F32', shape: [0], data_offsets: [0, 0] };
    const header = Buffer.from(JSON.stringify(entries));
    const weights = Buffer.alloc(8 + header.byteLength);
    weights.writeBigUInt64LE(BigInt(header.byteLength));
    header.copy(weights, 8);
    const good = artifact([randomLoreft(1, 2)]);
    const res = await upload(api, { config: good.config, weights: new Uint8Array(weights) });
    expectProblem(res, 400, 'artifact_weights_invalid');
  });

  it('a header longer than an artifact can need is refused by its length alone', async () => {
    const weights = Buffer.alloc(16);
    weights.writeBigUInt64LE(BigInt(2 * 1024 * 1024));
    const res = await upload(api, { config: artifact([randomLoreft(1, 2)]).config, weights: new Uint8Array(weights) });
    expectProblem(res, 400, 'artifact_weights_invalid');
  });

  it('a JSON body nested 4,150 deep is a 400 naming the depth limit, not a 500', async () => {
    const deep = '{"a":'.repeat(4150) + '1' + '}'.repeat(4150);
    const res = await json(api, 'POST', '/v1/fine_tuning/jobs', `{"training_file":"file-x","hyperparameters":${deep}}`);
    expectProblem(res, 400, 'body_too_deep', 'body');
  });

  it('a reft_config.json nested deeper than the limit is a 400', async () => {
    const good = artifact([randomLoreft(1, 2)]);
    const config = JSON.parse(Buffer.from(good.config).toString('utf8'));
    config.metadata = JSON.parse('{"a":'.repeat(100) + '"x"' + '}'.repeat(100));
    const res = await upload(api, { config: JSON.stringify(config), weights: good.weights });
    expectProblem(res, 400, 'artifact_config_too_deep');
  });
});

describe('finding 6: multipart parts are streamed against their limits, not buffered', () => {
  it('sixteen large parts to /v1/files (which takes one) are refused at the second', async () => {
    const form = new FormData();
    const part = new Uint8Array(3 * 1024 * 1024).fill(0x20);
    for (let i = 0; i < 16; i++) form.append('file', new Blob([part]), `d${i}.jsonl`);
    const probe = await refusedQuietly(() => post('/v1/files', form), 400, 'multipart_part_repeated', 60);
    expect(probe.result.body.field).toBe('file');
  });

  it('a part over the upload limit is a 413 naming the part and the limit', async () => {
    const form = new FormData();
    form.append('file', new Blob([new Uint8Array(UPLOAD_LIMIT + 1024).fill(0x20)]), 'big.jsonl');
    await refusedQuietly(() => post('/v1/files', form), 413, 'multipart_part_too_large', 60);
  });

  it('an unknown part is refused before it is read', async () => {
    const form = new FormData();
    form.append('junk', new Blob([new Uint8Array(3 * 1024 * 1024)]), 'junk.bin');
    form.append('file', new Blob(['{"prompt":"a","completion":"b"}\n']), 'd.jsonl');
    await refusedQuietly(() => post('/v1/files', form), 400, 'multipart_part_unknown', 60);
  });

  it('pyreft intkey parts are bounded by what the model hidden size allows', async () => {
    const form = pyreftForm(new Uint8Array(2 * 1024 * 1024));
    await refusedQuietly(() => post('/v1/interventions/import/pyreft', form), 413, 'multipart_part_too_large', 60);
  });
});
