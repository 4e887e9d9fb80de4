import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { STORIES as MODEL_DIR } from './fixtures.ts';

export const MODEL_FILES = [
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
export const NEEDED = [
  'config.json',
  'generation_config.json',
  'model.safetensors',
  'special_tokens_map.json',
  'tokenizer.json',
  'tokenizer_config.json',
];
export const TOKEN = 'hf_test_secret';

// ---------------------------------------------------------------------------------------------
// A stand-in for the Hugging Face Hub: the endpoints @huggingface/hub calls for modelInfo,
// pathsInfo and file downloads, with the headers it reads.
// ---------------------------------------------------------------------------------------------

export interface HubFile {
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

export function hubFile(bytes: Buffer, lfs: boolean): HubFile {
  const oid = createHash('sha1').update(`blob ${bytes.length}\0`).update(bytes).digest('hex');
  return { bytes, oid, sha256: lfs ? createHash('sha256').update(bytes).digest('hex') : undefined };
}

export function fakeSha(seed: string): string {
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

export class FakeHub {
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
  const names = Object.keys(header)
    .filter((n) => n !== '__metadata__')
    .sort();
  const groups = [names.slice(0, names.length >> 1), names.slice(names.length >> 1)];
  const shardNames = groups.map((_, i) => `model-0000${i + 1}-of-00002.safetensors`);
  const weightMap: Record<string, string> = {};
  const shards = groups.map((group, i): [string, Buffer] => {
    const parts: Buffer[] = [];
    const shardHeader: Record<string, unknown> = {};
    let offset = 0;
    for (const n of group) {
      const {
        dtype,
        shape,
        data_offsets: [b, e],
      } = header[n];
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

export async function populate(hub: FakeHub): Promise<{ mainSha: string; v1Sha: string }> {
  const files = await stories260kFiles();
  const mainSha = fakeSha('stories-main');
  const v1Sha = fakeSha('stories-v1');
  // v1 differs from main in one file, so a revision's content is observable.
  const v1Files = new Map(files);
  v1Files.set('generation_config.json', hubFile(Buffer.from('{"bos_token_id": 1, "eos_token_id": 2, "max_length": 64}\n'), false));
  hub.repos.set('tiny/stories260k', {
    commits: [
      { sha: mainSha, files },
      { sha: v1Sha, files: v1Files },
    ],
    refs: new Map([
      ['main', mainSha],
      ['v1', v1Sha],
    ]),
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
