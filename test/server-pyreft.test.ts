import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseSafetensors, toFloat32 } from '../src/model/safetensors.ts';
import { SHARED, STORIES } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { BIN, startServerProcess, type ServerProcess } from './support/server.ts';
import { BACKENDS } from './support/databases.ts';

const PYREFT = join(SHARED, 'fixtures', 'pyreft');
const manifest = JSON.parse(readFileSync(join(PYREFT, 'manifest.json'), 'utf8')) as Record<
  string,
  { expect: string; compare?: string; import: { positions: string; share_weights: boolean } }
>;
const okFolders = Object.keys(manifest).filter((k) => manifest[k].expect === 'ok');
const EVIL_MARKER = 'REFT_FIXTURE_EVIL_PICKLE_WAS_EXECUTED';
function expectSameArtifact(folder: string, config: Uint8Array, weights: Uint8Array) {
  const expectedDir = join(PYREFT, folder, 'expected');
  expect(JSON.parse(Buffer.from(config).toString())).toEqual(JSON.parse(readFileSync(join(expectedDir, 'reft_config.json'), 'utf8')));
  const got = parseSafetensors(weights, 'got');
  const want = parseSafetensors(new Uint8Array(readFileSync(join(expectedDir, 'reft_weights.safetensors'))), 'want');
  expect([...got.header.tensors.keys()].sort()).toEqual([...want.header.tensors.keys()].sort());
  const tolerant = (manifest[folder].compare ?? '').includes('abs 1e-6');
  for (const [name, info] of want.header.tensors) {
    const a = toFloat32(got, got.header.tensors.get(name)!);
    const b = toFloat32(want, info);
    const computed = tolerant && (name.endsWith('.rotate') || name.endsWith('.proj.weight'));
    for (let i = 0; i < b.length; i++) {
      if (computed) expect(Math.abs(a[i] - b[i]), `${folder} ${name}[${i}]`).toBeLessThanOrEqual(1e-6);
      else expect(Object.is(a[i], b[i]), `${folder} ${name}[${i}] ${a[i]} vs ${b[i]}`).toBe(true);
    }
  }
}

describe.each(BACKENDS)('on %s', (backend) => {
  /** Issue 6 end to end: pyreft folders through the HTTP API and the CLI. */

  let server: ServerProcess;
  let api: Api;
  let stdout = '';

  beforeAll(async () => {
    server = await startServerProcess({ backend });
    server.proc.stdout!.on('data', (d) => (stdout += d));
    api = { url: server.url };
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  function importForm(
    folder: string,
    fields: Record<string, string> = {},
    skip: (name: string) => boolean = () => false,
    edit?: (name: string, bytes: Buffer) => Buffer,
  ): FormData {
    const dir = join(PYREFT, folder);
    const form = new FormData();
    form.append('config', new Blob([readFileSync(join(dir, 'config.json'))]), 'config.json');
    for (const name of readdirSync(dir).filter((n) => n.startsWith('intkey_') && !skip(n))) {
      const bytes = readFileSync(join(dir, name));
      form.append('files', new Blob([edit ? edit(name, bytes) : bytes]), name);
    }
    const c = manifest[folder].import;
    form.append('positions', c.positions);
    form.append('share_weights', String(c.share_weights));
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    return form;
  }

  async function importVia(form: FormData) {
    const res = await fetch(`${api.url}/v1/interventions/import/pyreft`, { method: 'POST', body: form });
    return { status: res.status, body: (await res.json()) as any, type: res.headers.get('content-type') };
  }

  async function download(id: string, file: string): Promise<Uint8Array> {
    return new Uint8Array(await (await fetch(`${api.url}/v1/interventions/${id}/files/${file}`)).arrayBuffer());
  }

  describe('pyreft import through the API', () => {
    for (const folder of okFolders) {
      it(`${folder}: imports to its expected artifact and generates like it`, async () => {
        const res = await importVia(importForm(folder, { name: `py-${folder}` }));
        expect(res.status, JSON.stringify(res.body)).toBe(201);
        expect(res.body).toMatchObject({ name: `py-${folder}`, source: 'import' });
        expectSameArtifact(
          folder,
          await download(res.body.id, 'reft_config.json'),
          await download(res.body.id, 'reft_weights.safetensors'),
        );
        const expectedDir = join(PYREFT, folder, 'expected');
        const reference = await upload(
          api,
          {
            config: readFileSync(join(expectedDir, 'reft_config.json'), 'utf8'),
            weights: new Uint8Array(readFileSync(join(expectedDir, 'reft_weights.safetensors'))),
          },
          { name: `expected-${folder}` },
        );
        expect(reference.status).toBe(201);
        for (const prompt of ['Once upon a time', 'The little cat sat on the mat and looked at the sky']) {
          const body = { prompt, max_new_tokens: 20, ignore_eos: true };
          const imported = await json(api, 'POST', '/v1/generate', { ...body, adapter: res.body.id });
          const expected = await json(api, 'POST', '/v1/generate', { ...body, adapter: reference.body.id });
          expect(imported.body.token_ids).toEqual(expected.body.token_ids);
        }
      });
    }

    for (const folder of ['evil', 'evil_stack_global']) {
      it(`${folder}: refused naming the forbidden global; nothing runs, nothing is stored`, async () => {
        const before = (await json(api, 'GET', '/v1/interventions?limit=100')).body.data.length;
        const res = await importVia(importForm(folder, { name: folder }));
        expect(res.status).toBe(400);
        expect(res.type).toContain('application/problem+json');
        expect(res.body).toMatchObject({ code: 'pyreft_pickle_refused', category: 'invalid_intervention' });
        expect(res.body.detail).toMatch(/forbidden pickle .*(os system|posix system)/); // names the global it refused
        expect((await json(api, 'GET', '/v1/interventions?limit=100')).body.data.length).toBe(before);
        expect((await json(api, 'GET', `/v1/interventions/${folder}`)).status).toBe(404);
        await new Promise((r) => setTimeout(r, 100));
        expect(stdout + server.stderr()).not.toContain(EVIL_MARKER);
      });
    }

    it('broken uploads are refused and the server stays up', async () => {
      const folder = 'loreft_f32_split';
      const cases: Array<[FormData, string]> = [
        [importForm(folder, {}, (n) => n.endsWith('#1.bin')), 'pyreft_file_missing'],
        [
          importForm(
            folder,
            {},
            () => false,
            (_n, b) => b.subarray(0, b.length - 200),
          ),
          'pyreft_zip_invalid',
        ],
        [
          importForm(
            folder,
            {},
            () => false,
            (_n, b) => Buffer.from('not a zip at all'),
          ),
          'pyreft_zip_invalid',
        ],
      ];
      for (const [form, code] of cases) {
        const res = await importVia(form);
        expect(res.status, JSON.stringify(res.body)).toBe(400);
        expect(res.body.code).toBe(code);
      }
      const noPositions = importForm(folder);
      noPositions.delete('positions');
      expect((await importVia(noPositions)).body).toMatchObject({ code: 'pyreft_positions_missing', field: 'positions' });
      expect((await json(api, 'GET', '/healthz')).status).toBe(200);
    });
  });
});

describe('pyreft import through the CLI', () => {
  for (const folder of okFolders) {
    it(`${folder}`, () => {
      const out = mkdtempSync(join(tmpdir(), 'reft-import-'));
      const c = manifest[folder].import;
      const args = [
        BIN,
        'import-pyreft',
        join(PYREFT, folder),
        '--positions',
        c.positions,
        '--out',
        out,
        '--model',
        STORIES,
        ...(c.share_weights ? ['--share-weights'] : []),
      ];
      const r = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 60_000 });
      expect(r.status, r.stderr).toBe(0);
      expectSameArtifact(
        folder,
        new Uint8Array(readFileSync(join(out, 'reft_config.json'))),
        new Uint8Array(readFileSync(join(out, 'reft_weights.safetensors'))),
      );
    });
  }

  it('refuses an evil folder with a one-line error', () => {
    const out = mkdtempSync(join(tmpdir(), 'reft-import-'));
    const r = spawnSync(
      process.execPath,
      [BIN, 'import-pyreft', join(PYREFT, 'evil'), '--positions', 'f1+l1', '--share-weights', '--out', out, '--model', STORIES],
      { encoding: 'utf8', timeout: 60_000 },
    );
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^reft-server: forbidden pickle global "os system"/);
    expect(r.stdout + r.stderr).not.toContain(EVIL_MARKER);
    expect(readdirSync(out)).toEqual([]);
  });
});
