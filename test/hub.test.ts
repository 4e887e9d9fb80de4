import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ReftError } from '../src/errors.ts';
import { openCheckpoint } from '../src/model/checkpoint.ts';
import { resolveModelDir } from '../src/model/hub.ts';
import { FakeHub, NEEDED, TOKEN, populate } from './support/fake-hub.ts';
import { STORIES as MODEL_DIR } from './support/fixtures.ts';
import { BIN, runCli, startServerProcess } from './support/server.ts';
import { spawnSync } from 'node:child_process';

// ---------------------------------------------------------------------------------------------

async function caught(p: Promise<unknown>): Promise<ReftError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(ReftError);
  return e as ReftError;
}

/** A fetch that counts its calls, to prove cache hits stay off the network. */
function countingFetch(): { fetch: typeof fetch; calls: () => number } {
  let n = 0;
  return {
    fetch: (input, init) => {
      n++;
      return fetch(input, init);
    },
    calls: () => n,
  };
}

async function unusedPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

describe('resolveModelDir', () => {
  const hub = new FakeHub();
  let shas: { mainSha: string; v1Sha: string };
  let cacheDir: string;
  const savedEnv: Record<string, string | undefined> = {};
  const ENV_KEYS = ['HF_ENDPOINT', 'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE'];

  beforeAll(async () => {
    shas = await populate(hub);
    await hub.start();
  });
  afterAll(async () => {
    await hub.stop();
  });
  beforeEach(async () => {
    // The developer's own Hub settings must not leak into the tests.
    for (const k of ENV_KEYS) {
      savedEnv[k] = process.env[k];
      delete process.env[k];
    }
    cacheDir = await mkdtemp(join(tmpdir(), 'reft-hub-'));
    hub.log.length = 0;
  });
  afterEach(async () => {
    for (const k of ENV_KEYS) {
      if (savedEnv[k] === undefined) delete process.env[k];
      else process.env[k] = savedEnv[k];
    }
    await rm(cacheDir, { recursive: true, force: true });
  });

  it('returns an existing local directory as is', async () => {
    expect(await resolveModelDir(MODEL_DIR, { cacheDir })).toBe(MODEL_DIR);
    expect(hub.log).toHaveLength(0);
  });

  it('rejects a spec that is neither a directory nor a repo id', async () => {
    for (const spec of ['/no/such/model/dir', 'just-a-name', 'a/b/c', 'org/na me', 'org/name@', 'org/name@../x']) {
      const e = await caught(resolveModelDir(spec, { cacheDir, endpoint: hub.url }));
      expect(e).toMatchObject({ code: 'model_spec_invalid', category: 'invalid_model', field: 'model' });
    }
    expect(hub.log).toHaveLength(0);
  });

  it('downloads the model files into the Hub cache with identical bytes', async () => {
    const dir = await resolveModelDir('tiny/stories260k', { cacheDir, endpoint: hub.url });
    expect(dir).toBe(join(cacheDir, 'models--tiny--stories260k', 'snapshots', shas.mainSha));
    expect((await readdir(dir)).sort()).toEqual(NEEDED);
    for (const f of NEEDED) {
      expect((await readFile(join(dir, f))).equals(await readFile(join(MODEL_DIR, f))), f).toBe(true);
    }
    expect((await readFile(join(cacheDir, 'models--tiny--stories260k', 'refs', 'main'), 'utf8')).trim()).toBe(shas.mainSha);
    // The checkpoint reader follows the snapshot's symlinks into blobs/.
    const ckpt = await openCheckpoint(dir);
    expect(ckpt.dataDir).toBe(join(cacheDir, 'models--tiny--stories260k', 'blobs'));
    // The weights went through the CDN redirect, like LFS files on the real Hub.
    expect(hub.log.some((r) => r.url.startsWith('/cdn/'))).toBe(true);
  });

  it('serves a second resolve from the cache without any request, even with the Hub gone', async () => {
    const first = await resolveModelDir('tiny/stories260k', { cacheDir, endpoint: hub.url });
    const requests = hub.log.length;
    const counter = countingFetch();
    const offline = `http://127.0.0.1:${await unusedPort()}`;
    const second = await resolveModelDir('tiny/stories260k', { cacheDir, endpoint: offline, fetch: counter.fetch });
    expect(second).toBe(first);
    expect(counter.calls()).toBe(0);
    expect(hub.log.length).toBe(requests);
  });

  it('falls back to a cached snapshot when the Hub is unreachable and the branch ref is unknown', async () => {
    // Downloaded by commit hash, so refs/main was never written.
    const pinned = await resolveModelDir(`tiny/stories260k@${shas.mainSha}`, { cacheDir, endpoint: hub.url });
    const offline = `http://127.0.0.1:${await unusedPort()}`;
    expect(await resolveModelDir('tiny/stories260k', { cacheDir, endpoint: offline })).toBe(pinned);
    // An explicit other revision must not silently get the wrong snapshot.
    const e = await caught(resolveModelDir('tiny/stories260k@v1', { cacheDir, endpoint: offline }));
    expect(e).toMatchObject({ code: 'hub_unreachable', category: 'unavailable' });
  });

  it('downloads a named @revision into its own snapshot', async () => {
    const dir = await resolveModelDir('tiny/stories260k@v1', { cacheDir, endpoint: hub.url });
    expect(dir).toBe(join(cacheDir, 'models--tiny--stories260k', 'snapshots', shas.v1Sha));
    expect(JSON.parse(await readFile(join(dir, 'generation_config.json'), 'utf8')).max_length).toBe(64);
    expect((await readFile(join(cacheDir, 'models--tiny--stories260k', 'refs', 'v1'), 'utf8')).trim()).toBe(shas.v1Sha);
    // A commit-hash revision hits the same cached snapshot without the network.
    const counter = countingFetch();
    expect(await resolveModelDir(`tiny/stories260k@${shas.v1Sha}`, { cacheDir, endpoint: hub.url, fetch: counter.fetch })).toBe(dir);
    expect(counter.calls()).toBe(0);
  });

  it('shares one download between concurrent resolves', async () => {
    const specs = ['tiny/stories260k', 'tiny/stories260k', 'tiny/stories260k@v1', `tiny/stories260k@${shas.mainSha}`];
    const dirs = await Promise.all(specs.map((spec) => resolveModelDir(spec, { cacheDir, endpoint: hub.url })));
    const main = join(cacheDir, 'models--tiny--stories260k', 'snapshots', shas.mainSha);
    expect(dirs).toEqual([main, main, join(cacheDir, 'models--tiny--stories260k', 'snapshots', shas.v1Sha), main]);
    // Each file of main was fetched once; v1 only needed its one different file's body.
    const bodies = hub.log.filter((r) => r.url.startsWith('/cdn/') || r.url.includes('/resolve/'));
    expect(bodies.filter((r) => r.url.endsWith('/config.json'))).toHaveLength(2); // size probe + body
    for (const f of NEEDED) {
      expect((await readFile(join(main, f))).equals(await readFile(join(MODEL_DIR, f))), f).toBe(true);
    }
  });

  it('downloads the index and every shard of a sharded checkpoint', async () => {
    const dir = await resolveModelDir('tiny/stories-sharded', { cacheDir, endpoint: hub.url });
    const files = (await readdir(dir)).sort();
    expect(files).toContain('model.safetensors.index.json');
    expect(files).toContain('model-00001-of-00002.safetensors');
    expect(files).toContain('model-00002-of-00002.safetensors');
    expect(files).not.toContain('model.safetensors');
    const sharded = await openCheckpoint(dir);
    const single = await openCheckpoint(MODEL_DIR);
    expect([...sharded.weights.keys()].sort()).toEqual([...single.weights.keys()].sort());
  });

  it('reports an unknown repo and an unknown revision clearly', async () => {
    const e = await caught(resolveModelDir('tiny/nope', { cacheDir, endpoint: hub.url }));
    expect(e).toMatchObject({ code: 'hub_repo_not_found', category: 'invalid_model', field: 'model' });
    expect(e.message).toContain('Repository not found'); // the Hub's own words come along

    const r = await caught(resolveModelDir('tiny/stories260k@v9', { cacheDir, endpoint: hub.url }));
    expect(r).toMatchObject({ code: 'hub_repo_not_found', category: 'invalid_model', field: 'model' });
    expect(r.message).toContain('Invalid rev id: v9');
  });

  it('fails with one line pointing at --model when the Hub is unreachable and nothing is cached', async () => {
    const offline = `http://127.0.0.1:${await unusedPort()}`;
    const e = await caught(resolveModelDir('tiny/stories260k', { cacheDir, endpoint: offline }));
    expect(e).toMatchObject({ code: 'hub_unreachable', category: 'unavailable' });
    expect(e.message).not.toContain('\n');
    expect(e.message).toContain('--model /path/to/model');
    expect(e.message).toContain('config.json, model.safetensors, tokenizer.json');
    expect(e.message).toContain('ECONNREFUSED');
  });

  it('sends the token as a bearer Authorization header', async () => {
    const denied = await caught(resolveModelDir('tiny/private', { cacheDir, endpoint: hub.url }));
    expect(denied).toMatchObject({ code: 'hub_unauthorized', category: 'invalid_model' });
    expect(denied.message).toContain('HF_TOKEN');

    hub.log.length = 0;
    const dir = await resolveModelDir('tiny/private', { cacheDir, endpoint: hub.url, token: TOKEN });
    expect((await stat(join(dir, 'model.safetensors'))).size).toBe((await stat(join(MODEL_DIR, 'model.safetensors'))).size);
    expect(hub.log.length).toBeGreaterThan(0);
    for (const r of hub.log) expect(r.authorization, r.url).toBe(`Bearer ${TOKEN}`);

    const wrong = await caught(
      resolveModelDir('tiny/private@main', { cacheDir: join(cacheDir, 'other'), endpoint: hub.url, token: 'hf_wrong' }),
    );
    expect(wrong.code).toBe('hub_unauthorized');
    expect(wrong.message).toContain('not authorized');
  });

  it('honours HF_ENDPOINT and HF_TOKEN by default', async () => {
    process.env.HF_ENDPOINT = hub.url;
    process.env.HF_TOKEN = TOKEN;
    const dir = await resolveModelDir('tiny/private', { cacheDir });
    expect(dir).toContain(join('models--tiny--private', 'snapshots'));
    expect(hub.log.every((r) => r.authorization === `Bearer ${TOKEN}`)).toBe(true);
  });
});

describe('the Hub path end to end', () => {
  let hub: FakeHub;
  beforeAll(async () => {
    hub = new FakeHub();
    await populate(hub);
    await hub.start();
  });
  afterAll(() => hub.stop());

  it('`generate --model org/name` downloads once and generates; the server starts from the cache', async () => {
    const home = await mkdtemp(join(tmpdir(), 'reft-hf-home-'));
    const env = { ...process.env, HF_ENDPOINT: hub.url, HF_HOME: home, REFT_CACHE_DIR: join(home, 'reft') };
    const run = () => runCli(['generate', '--model', 'tiny/stories260k', '--prompt', 'Once upon a time', '--max-new-tokens', '32'], env);
    const first = await run();
    expect(first.status, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/^, there was a little girl named Lily\. She loved to play outside in the park\./);
    const requests = hub.log.length;
    expect(requests).toBeGreaterThan(0);
    await hub.stop(); // the second run must not need the Hub
    const second = await run();
    expect(second.stdout).toBe(first.stdout);
    const server = await startServerProcess({
      args: ['--model', 'tiny/stories260k', '--no-worker'],
      env: { HF_ENDPOINT: hub.url, HF_HOME: home },
    });
    try {
      const res = await fetch(`${server.url}/v1/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: 'Once upon a time', max_new_tokens: 32 }),
      });
      expect(((await res.json()) as { text: string }).text + '\n').toBe(first.stdout); // generate ends its output with a newline
    } finally {
      await server.stop();
      await hub.start();
    }
    expect(hub.log.length).toBe(requests);
  });

  it('offline with no local model: one line that says how to pass a local directory', async () => {
    const home = await mkdtemp(join(tmpdir(), 'reft-hf-home-'));
    const r = spawnSync(
      process.execPath,
      [BIN, 'serve', '--model', 'tiny/stories260k', '--port', '0', '--data-dir', join(home, 'data'), '--no-worker'],
      {
        encoding: 'utf8',
        env: { ...process.env, HF_ENDPOINT: `http://127.0.0.1:${await unusedPort()}`, HF_HOME: home },
        timeout: 60_000,
      },
    );
    expect(r.status).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^reft-server: could not download model tiny\/stories260k .*pass --model \/path\/to\/model/);
    // it never listened, and created nothing
    expect(r.stdout).not.toMatch(/Server listening/);
    expect(existsSync(join(home, 'data'))).toBe(false);
  });
});
