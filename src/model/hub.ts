import { mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { HubApiError, REGEX_COMMIT_HASH, downloadFileToCacheDir, getRepoFolderName, modelInfo } from '@huggingface/hub';
import {
  ReftError,
  hubDownloadFailed,
  hubForbidden,
  hubRepoIncomplete,
  hubRepoNotFound,
  hubShardMissing,
  hubUnauthorized,
  hubUnreachable,
  modelSpecInvalid,
  weightIndexInvalid,
} from '../errors.ts';

export interface ResolveModelOptions {
  /** Hub cache root (the HF_HUB_CACHE layout: models--org--name/{blobs,refs,snapshots}). */
  cacheDir: string;
  /** Hub base URL; defaults to HF_ENDPOINT, then https://huggingface.co. */
  endpoint?: string;
  /** Access token; defaults to HF_TOKEN. */
  token?: string;
  fetch?: typeof fetch;
}

/** Files the server reads besides the weights; the optional ones are fetched only if the repo has them. */
const REQUIRED_FILES = ['config.json', 'tokenizer.json', 'tokenizer_config.json'];
const OPTIONAL_FILES = ['generation_config.json', 'special_tokens_map.json', 'chat_template.jinja'];
const WEIGHTS = 'model.safetensors';
const WEIGHTS_INDEX = 'model.safetensors.index.json';
const DEFAULT_ENDPOINT = 'https://huggingface.co';
const LOCAL_HINT = 'to use a local copy, pass --model /path/to/model (a folder with config.json, model.safetensors, tokenizer.json)';

interface RepoRef {
  repo: string;
  revision: string;
  /** False when the spec had no @revision: then any cached snapshot is an acceptable offline fallback. */
  explicitRevision: boolean;
}

interface HubAccess {
  endpoint: string;
  token: string | undefined;
  fetch: typeof fetch;
}

/**
 * Turns `--model` into a local folder: an existing directory as is, otherwise a Hub repo id
 * (`org/name[@revision]`) whose model files are downloaded once into the Hub cache. A complete
 * cached snapshot is used without touching the network.
 */
export async function resolveModelDir(spec: string, opts: ResolveModelOptions): Promise<string> {
  if (await isDirectory(spec)) return spec;
  const ref = parseRepoSpec(spec);
  const storage = join(opts.cacheDir, getRepoFolderName({ type: 'model', name: ref.repo }));
  const cached = await cachedSnapshot(storage, ref.revision);
  if (cached) return cached;
  const hub = hubAccess(opts);
  if (isOfflineMode()) throw cannotDownload(spec, hub, 'HF_HUB_OFFLINE is set and the model is not cached');
  try {
    return await exclusive(storage, () => cachedOrDownload(ref, storage, opts.cacheDir, hub));
  } catch (e) {
    if (!isTransient(e)) throw toReftError(e, ref, hub);
    // The Hub can't answer; an older download of the default branch beats failing.
    const fallback = ref.explicitRevision ? null : await newestCompleteSnapshot(storage);
    if (fallback) return fallback;
    throw cannotDownload(spec, hub, describeFailure(e));
  }
}

/**
 * Downloads into one repo's cache folder run one at a time: revisions share blobs, and two writers
 * of the same blob's `.incomplete` file would corrupt each other. (Separate processes are not coordinated.)
 */
const repoQueues = new Map<string, Promise<unknown>>();

async function exclusive<T>(key: string, run: () => Promise<T>): Promise<T> {
  const next = (repoQueues.get(key) ?? Promise.resolve()).catch(() => undefined).then(run);
  repoQueues.set(key, next);
  try {
    return await next;
  } finally {
    if (repoQueues.get(key) === next) repoQueues.delete(key);
  }
}

/** Checks the cache again first: a concurrent resolve may have completed the snapshot meanwhile. */
async function cachedOrDownload(ref: RepoRef, storage: string, cacheDir: string, hub: HubAccess): Promise<string> {
  return (await cachedSnapshot(storage, ref.revision)) ?? downloadSnapshot(ref, storage, cacheDir, hub);
}

async function isDirectory(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

async function exists(path: string): Promise<boolean> {
  // stat follows the snapshot's symlinks, so a dangling link (blob deleted) counts as missing.
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Hub naming rules: letters, digits, '-', '_', '.', no '--' or '..', at most 96 characters. */
const NAME = /^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$/;

function isValidName(name: string): boolean {
  return NAME.test(name) && !name.includes('--') && !name.includes('..');
}

function isValidRevision(rev: string): boolean {
  return /^[A-Za-z0-9._/-]+$/.test(rev) && !rev.startsWith('/') && rev.split('/').every((s) => s !== '' && s !== '.' && s !== '..');
}

function parseRepoSpec(spec: string): RepoRef {
  const at = spec.indexOf('@');
  const repo = at < 0 ? spec : spec.slice(0, at);
  const revision = at < 0 ? 'main' : spec.slice(at + 1);
  const parts = repo.split('/');
  if (parts.length !== 2 || !parts.every(isValidName) || !isValidRevision(revision)) {
    throw modelSpecInvalid({ spec }, 'model');
  }
  return { repo, revision, explicitRevision: at >= 0 };
}

function hubAccess(opts: ResolveModelOptions): HubAccess {
  const endpoint = (opts.endpoint ?? process.env.HF_ENDPOINT ?? DEFAULT_ENDPOINT).replace(/\/+$/, '');
  const token = opts.token ?? process.env.HF_TOKEN ?? process.env.HUGGING_FACE_HUB_TOKEN;
  const baseFetch = opts.fetch ?? fetch;
  return { endpoint, token: token || undefined, fetch: token ? withToken(baseFetch, endpoint, token) : baseFetch };
}

/**
 * Adds the token to requests for the Hub itself and nowhere else (CDN and storage URLs carry their
 * own signatures). Done here rather than through the library's accessToken, which rejects tokens
 * that don't start with "hf_" (mirrors may issue others).
 */
function withToken(base: typeof fetch, endpoint: string, token: string): typeof fetch {
  const origin = new URL(endpoint).origin;
  return (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    if (new URL(url).origin === origin && !headers.has('authorization')) headers.set('authorization', `Bearer ${token}`);
    return base(input, { ...init, headers });
  };
}

function isOfflineMode(): boolean {
  return ['1', 'true', 'yes', 'on'].includes((process.env.HF_HUB_OFFLINE ?? '').toLowerCase());
}

/** The snapshot a revision points at in the cache, if every file the server needs is there. */
async function cachedSnapshot(storage: string, revision: string): Promise<string | null> {
  const commit = REGEX_COMMIT_HASH.test(revision)
    ? revision
    : await readFile(join(storage, 'refs', revision), 'utf8').then(
        (s) => s.trim(),
        () => null,
      );
  if (!commit || !REGEX_COMMIT_HASH.test(commit)) return null;
  const dir = join(storage, 'snapshots', commit);
  return (await isCompleteModelDir(dir)) ? dir : null;
}

async function newestCompleteSnapshot(storage: string): Promise<string | null> {
  const commits = await readdir(join(storage, 'snapshots')).catch(() => [] as string[]);
  const candidates: { dir: string; mtime: number }[] = [];
  for (const c of commits) {
    const dir = join(storage, 'snapshots', c);
    if (!(await isCompleteModelDir(dir))) continue;
    candidates.push({ dir, mtime: (await stat(dir)).mtimeMs });
  }
  candidates.sort((a, b) => b.mtime - a.mtime);
  return candidates[0]?.dir ?? null;
}

/** Required files present and every weight file the index names (or model.safetensors). */
async function isCompleteModelDir(dir: string): Promise<boolean> {
  for (const f of REQUIRED_FILES) if (!(await exists(join(dir, f)))) return false;
  const indexPath = join(dir, WEIGHTS_INDEX);
  if (!(await exists(indexPath))) return exists(join(dir, WEIGHTS));
  const shards = await readShardNames(indexPath).catch(() => null);
  if (!shards) return false;
  for (const s of shards) if (!(await exists(join(dir, s)))) return false;
  return true;
}

/** The weight files a model.safetensors.index.json names. */
async function readShardNames(indexPath: string): Promise<string[]> {
  return shardNames(JSON.parse(await readFile(indexPath, 'utf8')));
}

function shardNames(index: unknown): string[] {
  const map = (index as { weight_map?: unknown })?.weight_map;
  if (!map || typeof map !== 'object') throw weightIndexInvalid({ problem: 'has no weight_map' }, WEIGHTS_INDEX);
  const files = [...new Set(Object.values(map as Record<string, unknown>))];
  for (const f of files) {
    if (typeof f !== 'string' || basename(f) !== f || f === '' || f === '.' || f === '..') {
      throw weightIndexInvalid({ problem: `names an invalid file ${JSON.stringify(f)}` }, WEIGHTS_INDEX);
    }
  }
  return files as string[];
}

async function downloadSnapshot(ref: RepoRef, storage: string, cacheDir: string, hub: HubAccess): Promise<string> {
  const info = await modelInfo({
    name: ref.repo,
    revision: ref.revision,
    additionalFields: ['sha', 'filePaths'],
    hubUrl: hub.endpoint,
    fetch: hub.fetch,
  });
  const commit = info.sha;
  const available = new Set(info.filePaths);
  const where = `${ref.repo}@${ref.revision}`;
  for (const f of REQUIRED_FILES) {
    if (!available.has(f)) throw hubRepoIncomplete({ where, missing: f, hint: LOCAL_HINT }, 'model');
  }
  // Pinning every file to the commit keeps the snapshot consistent even if the branch moves meanwhile.
  const fetchFile = (path: string) =>
    downloadFileToCacheDir({
      repo: { type: 'model', name: ref.repo },
      path,
      revision: commit,
      cacheDir,
      hubUrl: hub.endpoint,
      fetch: hub.fetch,
    });

  // Small files first and weights last: a snapshot with its weights in place is then known complete.
  for (const f of OPTIONAL_FILES) if (available.has(f)) await fetchFile(f);
  for (const f of REQUIRED_FILES) await fetchFile(f);
  let snapshot: string;
  if (available.has(WEIGHTS)) {
    snapshot = dirname(await fetchFile(WEIGHTS));
  } else if (available.has(WEIGHTS_INDEX)) {
    const indexPath = await fetchFile(WEIGHTS_INDEX);
    snapshot = dirname(indexPath);
    for (const shard of await readShardNames(indexPath)) {
      if (!available.has(shard)) throw hubShardMissing({ where, index: WEIGHTS_INDEX, shard }, 'model');
      await fetchFile(shard);
    }
  } else {
    throw hubRepoIncomplete({ where, missing: `safetensors weights (${WEIGHTS} or ${WEIGHTS_INDEX})`, hint: LOCAL_HINT }, 'model');
  }
  // Written last, so a revision only resolves offline once its snapshot is complete.
  if (ref.revision !== commit) {
    const refPath = join(storage, 'refs', ref.revision);
    await mkdir(dirname(refPath), { recursive: true });
    await writeFile(refPath, commit);
  }
  return snapshot;
}

const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EPIPE',
]);

/** Errors along an error's `cause` chain, outermost first. */
function causes(e: unknown): unknown[] {
  const chain: unknown[] = [];
  for (let c: unknown = e; c !== undefined && c !== null && chain.length < 8; c = (c as { cause?: unknown }).cause) {
    chain.push(c);
    if (typeof c !== 'object') break;
  }
  return chain;
}

function isNetworkError(e: unknown): boolean {
  return causes(e).some((c) => {
    // The library aborts a failed body stream with the error's message (a bare string).
    if (typeof c === 'string') return /fetch failed|terminated|socket/i.test(c);
    if (!(c instanceof Error)) return false;
    const code = (c as NodeJS.ErrnoException).code ?? '';
    return (
      NETWORK_CODES.has(code) ||
      code.startsWith('UND_ERR') ||
      c.name === 'AbortError' ||
      c.name === 'TimeoutError' ||
      (c instanceof TypeError && (c.message === 'fetch failed' || c.message === 'terminated'))
    );
  });
}

/** Failures that say nothing about the repo itself: the Hub unreachable, overloaded or down. */
function isTransient(e: unknown): boolean {
  if (e instanceof HubApiError) return e.statusCode === 429 || e.statusCode >= 500;
  return isNetworkError(e);
}

/** The innermost readable reason, on one line. */
function describeFailure(e: unknown): string {
  if (e instanceof HubApiError) return `the Hub answered ${e.statusCode}`;
  const chain = causes(e);
  const inner = chain[chain.length - 1];
  const text = inner instanceof Error ? inner.message : String(inner);
  return text.replace(/\s+/g, ' ').trim() || 'unknown error';
}

function cannotDownload(spec: string, hub: HubAccess, reason: string): ReftError {
  return hubUnreachable({ spec, endpoint: hub.endpoint, reason, hint: LOCAL_HINT }, 'model');
}

function hubMessage(e: HubApiError): string {
  const data = e.data as { error?: unknown; message?: unknown } | undefined;
  const text = typeof data?.error === 'string' ? data.error : typeof data?.message === 'string' ? data.message : '';
  return text.replace(/\s+/g, ' ').trim();
}

function toReftError(e: unknown, ref: RepoRef, hub: HubAccess): ReftError {
  if (e instanceof ReftError) return e;
  const where = `${ref.repo}${ref.explicitRevision ? `@${ref.revision}` : ''}`;
  if (e instanceof HubApiError) {
    const said = hubMessage(e);
    const detail = said ? ` (${said})` : '';
    switch (e.statusCode) {
      case 401:
        // The Hub answers 401 both for missing repos and for private ones when the token is missing or bad.
        return hubUnauthorized({ where, endpoint: hub.endpoint, hasToken: Boolean(hub.token), detail }, 'model');
      case 403:
        return hubForbidden({ where, detail }, 'model');
      case 404:
        return hubRepoNotFound({ where, endpoint: hub.endpoint, detail }, 'model');
      default:
        return hubDownloadFailed({ where, endpoint: hub.endpoint, reason: ` with status ${e.statusCode}${detail}` }, 'model');
    }
  }
  const message = e instanceof Error ? e.message : String(e);
  return hubDownloadFailed({ where, endpoint: hub.endpoint, reason: `: ${message.replace(/\s+/g, ' ')}` }, 'model');
}
