import { createHash } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ReftError } from '../src/errors.ts';
import { openCheckpoint } from '../src/model/checkpoint.ts';
import { resolveModelDir } from '../src/model/hub.ts';

const MODEL_DIR = '/work/shared/models/stories260k';
const MODEL_FILES = [
  'LICENSE',
  'config.json',
  'generation_config.json',
  'model.safetensors',
  'special_tokens_map.json',
  'tokenizer.json',
  'tokenizer.model',
  'tokenizer_config.json',
];
/** What resolveModelDir should fetch from a single-file repo (tokenizer.model, LICENSE, README are not needed). */
const NEEDED = ['config.json', 'generation_config.json', 'model.safetensors', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json'];
const TOKEN = 'hf_test_secret';

// ---------------------------------------------------------------------------------------------
// A stand-in for the Hugging Face Hub: the endpoints @huggingface/hub calls for modelInfo,
// pathsInfo and file downloads, with the headers it reads.
// ---------------------------------------------------------------------------------------------

interface HubFile {
  bytes: Buffer;
  /** Git blob sha1: the ETag of regular files. */
  oid: string;
  /** Set for LFS files (weights): their ETag is the content sha256 and downloads redirect to a CDN path. */
  sha256?: string;
}

interface Commit {
  sha: string;
  files: Map<string, HubFile>;
}

interface Repo {
  commits: Commit[];
  refs: Map<string, string>;
  /** Private repos answer 401 unless this bearer token is sent. */
  requiresToken?: string;
}

interface LoggedRequest {
  method: string;
  url: string;
  authorization: string | undefined;
}

function hubFile(bytes: Buffer, lfs: boolean): HubFile {
  const oid = createHash('sha1').update(`blob ${bytes.length}\0`).update(bytes).digest('hex');
  return { bytes, oid, sha256: lfs ? createHash('sha256').update(bytes).digest('hex') : undefined };
}

function fakeSha(seed: string): string {
  return createHash('sha1').update(seed).digest('hex');
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

/** Serves bytes with single-range support, as the Hub (and its CDN) do. */
function sendBytes(req: IncomingMessage, res: ServerResponse, bytes: Buffer, headers: Record<string, string>): void {
  const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
  if (range) {
    const start = Number(range[1]);
    const end = Math.min(range[2] === '' ? bytes.length - 1 : Number(range[2]), bytes.length - 1);
    const part = bytes.subarray(start, end + 1);
    res.writeHead(206, { ...headers, 'Content-Range': `bytes ${start}-${end}/${bytes.length}`, 'Content-Length': part.length });
    res.end(part);
    return;
  }
  res.writeHead(200, { ...headers, 'Content-Length': bytes.length });
  res.end(bytes);
}

class FakeHub {
  readonly repos = new Map<string, Repo>();
  readonly log: LoggedRequest[] = [];
  private server: Server | null = null;
  url = '';

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      void this.handle(req, res).catch((e: Error) => {
        res.writeHead(500);
        res.end(e.message);
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = null;
    // fetch keeps connections alive; drop them so close() returns now.
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeAllConnections();
    await closed;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    this.log.push({ method: req.method ?? '', url: req.url ?? '', authorization: req.headers.authorization });
    const url = new URL(req.url ?? '/', this.url);
    const parts = url.pathname.split('/').map(decodeURIComponent);
    // /api/models/{org}/{name}/revision/{rev}
    if (parts[1] === 'api' && parts[2] === 'models' && parts[5] === 'revision' && req.method === 'GET') {
      return this.modelInfo(req, res, `${parts[3]}/${parts[4]}`, parts.slice(6).join('/'));
    }
    // POST /api/models/{org}/{name}/paths-info/{rev}
    if (parts[1] === 'api' && parts[2] === 'models' && parts[5] === 'paths-info' && req.method === 'POST') {
      return this.pathsInfo(req, res, `${parts[3]}/${parts[4]}`, parts.slice(6).join('/'), await readBody(req));
    }
    // /{org}/{name}/resolve/{rev}/{path}
    if (parts[3] === 'resolve' && req.method === 'GET') {
      return this.resolve(req, res, `${parts[1]}/${parts[2]}`, parts[4], parts.slice(5).join('/'));
    }
    // The CDN that LFS downloads redirect to.
    if (parts[1] === 'cdn' && req.method === 'GET') return this.cdn(req, res, parts[2]);
    sendJson(res, 404, { error: 'Not found' });
  }

  /** Finds repo + commit the way the Hub does, answering the Hub's errors itself. */
  private lookup(req: IncomingMessage, res: ServerResponse, name: string, rev: string): { repo: Repo; commit: Commit } | null {
    const repo = this.repos.get(name);
    if (!repo) {
      sendJson(res, 404, { error: 'Repository not found' }, { 'X-Error-Code': 'RepoNotFound' });
      return null;
    }
    if (repo.requiresToken && req.headers.authorization !== `Bearer ${repo.requiresToken}`) {
      sendJson(res, 401, { error: 'Invalid credentials in Authorization header' }, { 'X-Error-Code': 'RepoNotFound' });
      return null;
    }
    const sha = repo.refs.get(rev) ?? rev;
    const commit = repo.commits.find((c) => c.sha === sha);
    if (!commit) {
      sendJson(res, 404, { error: `Invalid rev id: ${rev}` }, { 'X-Error-Code': 'RevisionNotFound' });
      return null;
    }
    return { repo, commit };
  }

  private modelInfo(req: IncomingMessage, res: ServerResponse, name: string, rev: string): void {
    const found = this.lookup(req, res, name, rev);
    if (!found) return;
    sendJson(res, 200, {
      _id: fakeSha(name).slice(0, 24),
      id: name,
      sha: found.commit.sha,
      siblings: [...found.commit.files.keys()].map((rfilename) => ({ rfilename })),
      private: Boolean(found.repo.requiresToken),
      gated: false,
      downloads: 0,
      likes: 0,
      lastModified: '2024-01-01T00:00:00.000Z',
      pipeline_tag: 'text-generation',
    });
  }

  private pathsInfo(req: IncomingMessage, res: ServerResponse, name: string, rev: string, body: string): void {
    const found = this.lookup(req, res, name, rev);
    if (!found) return;
    const { paths } = JSON.parse(body) as { paths: string[] };
    const entries = paths.flatMap((path) => {
      const f = found.commit.files.get(path);
      if (!f) return [];
      return [
        {
          type: 'file',
          path,
          oid: f.oid,
          size: f.bytes.length,
          ...(f.sha256 && { lfs: { oid: f.sha256, size: f.bytes.length, pointerSize: 134 } }),
          lastCommit: { id: found.commit.sha, title: 'upload', date: '2024-01-01T00:00:00.000Z' },
        },
      ];
    });
    sendJson(res, 200, entries);
  }

  private resolve(req: IncomingMessage, res: ServerResponse, name: string, rev: string, path: string): void {
    const found = this.lookup(req, res, name, rev);
    if (!found) return;
    const f = found.commit.files.get(path);
    if (!f) {
      sendJson(res, 404, { error: 'Entry not found' }, { 'X-Error-Code': 'EntryNotFound' });
      return;
    }
    const common = { 'X-Repo-Commit': found.commit.sha, 'Accept-Ranges': 'bytes' };
    if (f.sha256) {
      // LFS files: the Hub redirects to a CDN and names the real object in X-Linked-* headers.
      res.writeHead(302, {
        ...common,
        Location: `/cdn/${f.sha256}`,
        ETag: `"${f.oid}"`,
        'X-Linked-Etag': `"${f.sha256}"`,
        'X-Linked-Size': String(f.bytes.length),
        'Content-Length': 0,
      });
      res.end();
      return;
    }
    sendBytes(req, res, f.bytes, { ...common, ETag: `"${f.oid}"`, 'Content-Type': 'text/plain; charset=utf-8' });
  }

  private cdn(req: IncomingMessage, res: ServerResponse, sha256: string): void {
    for (const repo of this.repos.values()) {
      for (const c of repo.commits) {
        for (const f of c.files.values()) {
          if (f.sha256 === sha256) return sendBytes(req, res, f.bytes, { ETag: `"${sha256}"`, 'Content-Type': 'application/octet-stream' });
        }
      }
    }
    res.writeHead(404);
    res.end();
  }
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

// ---------------------------------------------------------------------------------------------
// Repos the stand-in serves.
// ---------------------------------------------------------------------------------------------

async function stories260kFiles(): Promise<Map<string, HubFile>> {
  const files = new Map<string, HubFile>();
  for (const f of MODEL_FILES) files.set(f, hubFile(await readFile(join(MODEL_DIR, f)), f.endsWith('.safetensors')));
  files.set('README.md', hubFile(Buffer.from('# stories260k\n'), false));
  return files;
}

/** Splits a safetensors file into two valid shards plus the index that maps tensors to them. */
function splitSafetensors(bytes: Buffer): { shards: [string, Buffer][]; index: Buffer } {
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const data = bytes.subarray(8 + headerLength);
  const names = Object.keys(header).filter((n) => n !== '__metadata__').sort();
  const groups = [names.slice(0, names.length >> 1), names.slice(names.length >> 1)];
  const shardNames = groups.map((_, i) => `model-0000${i + 1}-of-00002.safetensors`);
  const weightMap: Record<string, string> = {};
  const shards = groups.map((group, i): [string, Buffer] => {
    const parts: Buffer[] = [];
    const shardHeader: Record<string, unknown> = {};
    let offset = 0;
    for (const n of group) {
      const { dtype, shape, data_offsets: [b, e] } = header[n];
      shardHeader[n] = { dtype, shape, data_offsets: [offset, offset + e - b] };
      parts.push(data.subarray(b, e));
      offset += e - b;
      weightMap[n] = shardNames[i];
    }
    let json = JSON.stringify(shardHeader);
    json += ' '.repeat((8 - (json.length % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    return [shardNames[i], Buffer.concat([len, Buffer.from(json), ...parts])];
  });
  const index = Buffer.from(JSON.stringify({ metadata: { total_size: data.length }, weight_map: weightMap }, null, 2));
  return { shards, index };
}

async function populate(hub: FakeHub): Promise<{ mainSha: string; v1Sha: string }> {
  const files = await stories260kFiles();
  const mainSha = fakeSha('stories-main');
  const v1Sha = fakeSha('stories-v1');
  // v1 differs from main in one file, so a revision's content is observable.
  const v1Files = new Map(files);
  v1Files.set('generation_config.json', hubFile(Buffer.from('{"bos_token_id": 1, "eos_token_id": 2, "max_length": 64}\n'), false));
  hub.repos.set('tiny/stories260k', {
    commits: [{ sha: mainSha, files }, { sha: v1Sha, files: v1Files }],
    refs: new Map([['main', mainSha], ['v1', v1Sha]]),
  });

  const sharded = new Map(files);
  sharded.delete('model.safetensors');
  const { shards, index } = splitSafetensors(files.get('model.safetensors')!.bytes);
  sharded.set('model.safetensors.index.json', hubFile(index, false));
  for (const [name, bytes] of shards) sharded.set(name, hubFile(bytes, true));
  const shardedSha = fakeSha('sharded-main');
  hub.repos.set('tiny/stories-sharded', { commits: [{ sha: shardedSha, files: sharded }], refs: new Map([['main', shardedSha]]) });

  const privateSha = fakeSha('private-main');
  hub.repos.set('tiny/private', {
    commits: [{ sha: privateSha, files }],
    refs: new Map([['main', privateSha]]),
    requiresToken: TOKEN,
  });
  return { mainSha, v1Sha };
}

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
      expect(e.code).toBe('invalid_model');
      expect(e.message).toContain('neither an existing directory nor a Hugging Face repo id');
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
    expect(e.code).toBe('unavailable');
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
    expect(e.code).toBe('invalid_model');
    expect(e.field).toBe('model');
    expect(e.message).toMatch(/tiny\/nope was not found/);
    expect(e.message).toContain('Repository not found');

    const r = await caught(resolveModelDir('tiny/stories260k@v9', { cacheDir, endpoint: hub.url }));
    expect(r.code).toBe('invalid_model');
    expect(r.message).toContain('tiny/stories260k@v9');
    expect(r.message).toContain('Invalid rev id: v9');
  });

  it('fails with one line pointing at --model when the Hub is unreachable and nothing is cached', async () => {
    const offline = `http://127.0.0.1:${await unusedPort()}`;
    const e = await caught(resolveModelDir('tiny/stories260k', { cacheDir, endpoint: offline }));
    expect(e.code).toBe('unavailable');
    expect(e.message).not.toContain('\n');
    expect(e.message).toContain('could not download model tiny/stories260k');
    expect(e.message).toContain('--model /path/to/model');
    expect(e.message).toContain('config.json, model.safetensors, tokenizer.json');
    expect(e.message).toContain('ECONNREFUSED');
  });

  it('sends the token as a bearer Authorization header', async () => {
    const denied = await caught(resolveModelDir('tiny/private', { cacheDir, endpoint: hub.url }));
    expect(denied.code).toBe('invalid_model');
    expect(denied.message).toContain('HF_TOKEN');

    hub.log.length = 0;
    const dir = await resolveModelDir('tiny/private', { cacheDir, endpoint: hub.url, token: TOKEN });
    expect((await stat(join(dir, 'model.safetensors'))).size).toBe((await stat(join(MODEL_DIR, 'model.safetensors'))).size);
    expect(hub.log.length).toBeGreaterThan(0);
    for (const r of hub.log) expect(r.authorization, r.url).toBe(`Bearer ${TOKEN}`);

    const wrong = await caught(resolveModelDir('tiny/private@main', { cacheDir: join(cacheDir, 'other'), endpoint: hub.url, token: 'hf_wrong' }));
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
