/**
 * The Store contract: every test here runs against each implementation (test/sqlite-store.test.ts,
 * test/postgres-store.test.ts), each on fresh, empty storage per test. Tests of one backend's
 * own machinery (blob files, crash points, LISTEN/NOTIFY, outages) stay in that backend's file.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ReftError } from '../../src/errors.ts';
import type { NewIntervention, Page, Store, UsageRecord } from '../../src/storage/store.ts';

export interface StoreBackend {
  name: 'sqlite' | 'postgres';
  /** Makes fresh, empty storage for one test; returns where it is (a data directory, a database URL). */
  create(): Promise<string>;
  open(location: string): Promise<Store>;
  /** Opens a store that migrates only up to `schemaVersion`: storage as an older server left it. */
  openAt(location: string, schemaVersion: number): Promise<Store>;
  /** The schema versions recorded as applied, ascending. */
  schemaVersions(location: string): Promise<number[]>;
  /** Removes the storage after the test; every store opened on it is closed by then. */
  destroy(location: string): Promise<void>;
  /** The blob files under a location, for a backend that keeps file bytes outside its database. */
  blobs?(location: string): Promise<string[]>;
}

export interface StoreFixture {
  /** This test's storage. */
  readonly location: string;
  /** Opens a store on it (closed after the test). */
  open(): Promise<Store>;
  /** Opens a store on it migrated only up to `schemaVersion` (closed after the test). */
  openAt(schemaVersion: number): Promise<Store>;
  /** Blob file names, or null for a backend without blob files. */
  blobs(): Promise<string[] | null>;
  /** Expects n blob files where the backend has them; passes elsewhere. */
  expectBlobs(n: number): Promise<void>;
}

/** Fresh storage for every test of the enclosing describe block, cleaned up after it. */
export function useStoreFixture(backend: StoreBackend): StoreFixture {
  let location: string | undefined;
  let opened: Store[] = [];
  beforeEach(async () => {
    location = await backend.create();
    opened = [];
  });
  afterEach(async () => {
    for (const s of opened) await s.close();
    if (location !== undefined) await backend.destroy(location);
    location = undefined;
  });
  const here = () => {
    if (location === undefined) throw new Error('no storage outside a test');
    return location;
  };
  const blobs = async () => (backend.blobs ? (await backend.blobs(here())).sort() : null);
  return {
    get location() {
      return here();
    },
    async open() {
      const s = await backend.open(here());
      opened.push(s);
      return s;
    },
    async openAt(schemaVersion) {
      const s = await backend.openAt(here(), schemaVersion);
      opened.push(s);
      return s;
    },
    blobs,
    async expectBlobs(n) {
      const names = await blobs();
      if (names !== null) expect(names).toHaveLength(n);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the backend test files.
// ---------------------------------------------------------------------------------------------

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** storedUsage of a tenant with interventions only: no training files, no unfinished jobs. */
export const storedOnly = (interventions: number, bytes: number) => ({ interventions, bytes, files: 0, fileBytes: 0, activeJobs: 0 });
export const bytes = (n: number) => new Uint8Array(randomBytes(n));

export function newIv(tenantId: string | null, name: string, size = 64): NewIntervention {
  return {
    tenantId,
    name,
    description: `about ${name}`,
    source: 'upload',
    config: { name, layers: [1, 2] },
    files: { config: new TextEncoder().encode(JSON.stringify({ name })), weights: bytes(size) },
  };
}

export async function rejection(p: Promise<unknown>): Promise<ReftError> {
  const e = await p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(ReftError);
  return e as ReftError;
}

/** Every item of a paged list, walking the cursor with the given page size. */
export async function collect<T extends { id: string }>(fetch: (after?: string) => Promise<Page<T>>): Promise<T[]> {
  const all: T[] = [];
  let after: string | undefined;
  for (;;) {
    const page = await fetch(after);
    all.push(...page.data);
    if (page.nextCursor === null) return all;
    expect(page.nextCursor).toBe(page.data[page.data.length - 1].id);
    after = page.nextCursor;
  }
}

/** Polls until `check` stops throwing, or rethrows its last error after `timeoutMs`. */
export async function eventually<T>(check: () => T | Promise<T>, timeoutMs = 5_000, everyMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await sleep(everyMs);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Child processes on the same store (test/support/store-child.ts says what each mode does).
// ---------------------------------------------------------------------------------------------

const ROOT = resolve(import.meta.dirname, '../..');
const CHILD = join(ROOT, 'test/support/store-child.ts');

export interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  pid: number;
}

export interface ChildOptions {
  /** Called with each line the child prints, and a function that writes a line to its stdin. */
  onLine?: (line: string, send: (line: string) => void) => void;
}

export function runChild(
  backend: StoreBackend['name'],
  location: string,
  args: string[],
  options: ChildOptions = {},
): Promise<ChildResult> {
  return runNode([CHILD, backend, location, ...args], options);
}

/**
 * Runs `code` (JavaScript, an ES module, so top-level await works) in another node process with
 * tsx loaded, so it can import the project's .ts modules (by file URL: see `moduleUrl`). Its
 * `process.argv.slice(1)` is `args`.
 */
export function runScript(code: string, args: string[], options: ChildOptions = {}): Promise<ChildResult> {
  return runNode(['--input-type=module', '--eval', code, ...args], options);
}

/** A file URL for a module of the project, for `import()` in a `runScript` child. */
export const moduleUrl = (path: string): string => pathToFileURL(join(ROOT, path)).href;

function runNode(args: string[], options: ChildOptions): Promise<ChildResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', ...args], {
      cwd: ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const send = (line: string) => child.stdin.write(`${line}\n`);
    child.stdin.on('error', () => {}); // a child that exits early closes its stdin
    let stdout = '';
    let stderr = '';
    let partial = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d;
      partial += d;
      const lines = partial.split('\n');
      partial = lines.pop()!;
      for (const l of lines) options.onLine?.(l, send);
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      child.stdin.destroy();
      resolvePromise({ code, signal, stdout, stderr, pid: child.pid! });
    });
  });
}

/** The JSON object a child printed last. */
export function lastJson<T>(result: ChildResult): T {
  return JSON.parse(result.stdout.trim().split('\n').at(-1)!) as T;
}

/** Where each backend's store comes from, for a `runScript` child. */
const STORE_MODULES: Record<StoreBackend['name'], { path: string; open: string }> = {
  sqlite: { path: 'src/storage/sqlite-store.ts', open: 'openSqliteStore' },
  postgres: { path: 'src/storage/postgres-store.ts', open: 'openPostgresStore' },
};

/**
 * A usage writer (a `runScript` child). Args: the store module's URL, its open function, the
 * location, and a JSON plan { tenants, days, calls, ghost }. It opens a store, prints "ready",
 * waits for "go" on stdin, then makes `calls` concurrent recordUsage calls: call i adds
 * { requests: 1, promptTokens: i + 1, completionTokens: 2, trainingTokens: 3 } to every tenant
 * on every day, plus one entry for the tenant `ghost`, which does not exist; odd calls list
 * their entries in reverse. Prints { done } at the end.
 */
const USAGE_WRITER = `
  import { createInterface } from 'node:readline';
  const [moduleUrl, opener, location, planJson] = process.argv.slice(1);
  const { tenants, days, calls, ghost } = JSON.parse(planJson);
  const store = await (await import(moduleUrl))[opener](location);
  console.log('ready');
  await new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin });
    rl.on('line', (line) => {
      if (line.trim() !== 'go') return;
      rl.close();
      process.stdin.destroy();
      resolve();
    });
  });
  await Promise.all(Array.from({ length: calls }, (_, i) => {
    const entries = [];
    for (const tenantId of tenants) {
      for (const day of days) entries.push({ tenantId, day, requests: 1, promptTokens: i + 1, completionTokens: 2, trainingTokens: 3 });
    }
    entries.push({ tenantId: ghost, day: days[0], requests: 1, promptTokens: 1, completionTokens: 1, trainingTokens: 1 });
    if (i % 2) entries.reverse();
    return store.recordUsage(entries);
  }));
  await store.close();
  console.log(JSON.stringify({ done: calls }));
`;

/** A usage entry with the given counts (zero where not given). */
export function usageOf(tenantId: string, day: string, counts: Partial<Omit<UsageRecord, 'tenantId' | 'day'>> = {}): UsageRecord {
  return { tenantId, day, requests: 0, promptTokens: 0, completionTokens: 0, trainingTokens: 0, ...counts };
}

/** A tenant id the store could have made but did not. */
const GHOST_TENANT = `ten_${'0'.repeat(24)}`;

// ---------------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------------

export function storeContract(backend: StoreBackend): void {
  describe('Store contract', () => {
    const fx = useStoreFixture(backend);
    const open = () => fx.open();

    describe('tenants and API keys', () => {
      it('creates, gets and pages tenants', async () => {
        const store = await open();
        const made = [];
        for (let i = 0; i < 7; i++) made.push(await store.createTenant(`t${i}`));
        expect(made[0].id).toMatch(/^ten_[0-9a-f]{24}$/);
        expect(new Date(made[0].createdAt).toISOString()).toBe(made[0].createdAt);
        expect(await store.getTenant(made[3].id)).toEqual(made[3]);
        expect(await store.getTenant('ten_missing')).toBeNull();

        const first = await store.listTenants({ limit: 3 });
        expect(first.data).toHaveLength(3);
        expect(first.nextCursor).toBe(first.data[2].id);
        const all = await collect((after) => store.listTenants({ limit: 3, after }));
        expect(all.map((t) => t.id)).toEqual(made.map((t) => t.id));
        const exact = await store.listTenants({ limit: 7 });
        expect(exact.nextCursor).toBeNull();
        expect((await rejection(store.listTenants({ limit: 3, after: 'ten_nope' }))).field).toBe('after');
      });

      it('finds live keys by hash, never revoked ones', async () => {
        const store = await open();
        const t = await store.createTenant('acme');
        const key = await store.createApiKey(t.id, 'hash-1');
        expect(key).toMatchObject({ tenantId: t.id, revokedAt: null });
        expect(key.id).toMatch(/^key_[0-9a-f]{24}$/);
        expect(await store.findApiKey('hash-1')).toEqual({ key, tenant: t });
        expect(await store.findApiKey('hash-2')).toBeNull();

        expect(await store.revokeApiKey(key.id)).toBe(true);
        expect(await store.revokeApiKey(key.id)).toBe(false);
        expect(await store.revokeApiKey('key_unknown')).toBe(false);
        expect(await store.findApiKey('hash-1')).toBeNull();

        expect((await rejection(store.createApiKey('ten_missing', 'h'))).code).toBe('tenant_not_found');
        const reused = await rejection(store.createApiKey(t.id, 'hash-1')); // hashes are unique
        expect([reused.code, reused.field]).toEqual(['api_key_taken', 'secretHash']);
      });

      it("lists a tenant's keys with their prefixes and last use; renames tenants, names unique", async () => {
        const store = await open();
        const [t, other] = [await store.createTenant('acme'), await store.createTenant('other')];
        const k1 = await store.createApiKey(t.id, 'hash-1', 'rft_abcd');
        const k2 = await store.createApiKey(t.id, 'hash-2', 'rft_efgh');
        await store.createApiKey(other.id, 'hash-3', 'rft_ijkl');
        expect(k1).toMatchObject({ prefix: 'rft_abcd', lastUsedAt: null });
        await store.touchApiKey(k2.id);
        await store.revokeApiKey(k1.id);
        // Oldest first; two made in the same millisecond may come in either order.
        const keys = (await store.listApiKeys(t.id)).sort((x, y) => (x.id === k1.id ? -1 : y.id === k1.id ? 1 : 0));
        expect(keys.map((k) => [k.id, k.prefix, k.revokedAt !== null, k.lastUsedAt !== null])).toEqual([
          [k1.id, 'rft_abcd', true, false],
          [k2.id, 'rft_efgh', false, true],
        ]);
        expect(JSON.stringify(keys)).not.toContain('hash-');
        expect(await store.listApiKeys('ten_missing')).toEqual([]);

        expect(await store.renameTenant(t.id, 'acme 2')).toEqual({ ...t, name: 'acme 2' });
        expect(await store.renameTenant('ten_missing', 'x')).toBeNull();
        for (const taken of [rejection(store.createTenant('other')), rejection(store.renameTenant(t.id, 'other'))]) {
          const e = await taken;
          expect([e.code, e.category, e.field]).toEqual(['tenant_name_taken', 'conflict', 'name']);
        }
        expect((await store.getTenant(t.id))!.name).toBe('acme 2');
      });

      it('deletes a tenant with all it owns, files included, and tells listeners; others are untouched', async () => {
        const store = await open();
        const [t, other] = [await store.createTenant('doomed'), await store.createTenant('kept')];
        await store.createApiKey(t.id, 'hash-doomed');
        const iv = await store.putIntervention(newIv(t.id, 'iv'));
        const kept = await store.putIntervention(newIv(other.id, 'iv'));
        const file = await store.putFile(t.id, 'data.jsonl', 'fine-tune', new TextEncoder().encode('{}'));
        const job = await store.createJob(t.id, { n: 1 });
        const claimed = await store.claimJob('w', 60_000, 3);
        expect(await store.saveCheckpoint(job.id, 'w', 1, new Uint8Array(8))).toBe(true);
        await store.recordUsage([usageOf(t.id, '2024-01-01', { requests: 1 }), usageOf(other.id, '2024-01-01', { requests: 2 })]);
        await fx.expectBlobs(6);
        const heard: string[] = [];
        store.onInterventionChanged((id) => heard.push(id));

        expect(await store.deleteTenant(t.id)).toBe(true);
        expect(await store.deleteTenant(t.id)).toBe(false);
        expect(claimed!.job.id).toBe(job.id);
        expect(await store.getTenant(t.id)).toBeNull();
        expect(await store.findApiKey('hash-doomed')).toBeNull();
        expect(await store.findIntervention(t.id, iv.id)).toBeNull();
        expect(await store.readInterventionFiles(iv.id)).toBeNull();
        expect(await store.getFile(t.id, file.id)).toBeNull();
        expect(await store.getJob(null, job.id)).toBeNull();
        expect(await store.loadCheckpoint(job.id)).toBeNull();
        expect(await store.getUsage(t.id, '2024-01-01', '2024-01-01')).toEqual([]);
        expect(heard).toEqual([iv.id]);
        await fx.expectBlobs(2);
        expect(await store.findIntervention(other.id, kept.id)).toEqual(kept);
        expect((await store.getUsage(other.id, '2024-01-01', '2024-01-01'))[0].requests).toBe(2);
        expect(await store.renameTenant(other.id, 'doomed')).toMatchObject({ name: 'doomed' }); // the name is free again
      });

      it('counts jobs per status, of every tenant', async () => {
        const store = await open();
        const [a, b] = [await store.createTenant('a'), await store.createTenant('b')];
        const none = { queued: 0, running: 0, succeeded: 0, failed: 0, cancelled: 0 };
        expect(await store.countJobs()).toEqual(none);
        for (const t of [a, b, b, a]) await store.createJob(t.id, {});
        const claimed = (await store.claimJob('w', 60_000, 3))!;
        await store.requestCancel(b.id, (await store.listJobs(b.id, { limit: 1 })).data[0].id);
        expect(await store.finishJob(claimed.job.id, 'w', { status: 'failed', error: 'x' })).toBe(true);
        expect(await store.countJobs()).toEqual({ ...none, queued: 2, failed: 1, cancelled: 1 });
      });
    });

    describe('interventions', () => {
      it('stores, finds by id or name, and reads back byte-identical files', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const iv = newIv(t.id, 'sentiment', 5000);
        const meta = await store.putIntervention(iv);
        expect(meta).toMatchObject({
          tenantId: t.id,
          name: 'sentiment',
          description: 'about sentiment',
          source: 'upload',
          version: 1,
          config: iv.config,
          bytes: iv.files.config.byteLength + 5000,
        });
        expect(meta.id).toMatch(/^iv_[0-9a-f]{24}$/);
        // The digest of the config bytes followed by the weights bytes.
        const digest = createHash('sha256').update(iv.files.config).update(iv.files.weights).digest('hex');
        expect(meta.sha256).toBe(digest);
        expect(meta.createdAt).toBe(meta.updatedAt);

        expect(await store.findIntervention(t.id, meta.id)).toEqual(meta);
        expect(await store.findIntervention(t.id, 'sentiment')).toEqual(meta);
        expect(await store.findIntervention(t.id, 'other')).toBeNull();
        const files = await store.readInterventionFiles(meta.id);
        expect(Buffer.from(files!.config).equals(Buffer.from(iv.files.config))).toBe(true);
        expect(Buffer.from(files!.weights).equals(Buffer.from(iv.files.weights))).toBe(true);
        expect(await store.readInterventionFiles('iv_missing')).toBeNull();
        await fx.expectBlobs(2);
      });

      it('keeps tenants apart: another tenant cannot find, list, replace or delete', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const ofA = await store.putIntervention(newIv(a.id, 'secret'));

        expect(await store.findIntervention(b.id, ofA.id)).toBeNull();
        expect(await store.findIntervention(b.id, 'secret')).toBeNull();
        expect(await store.findIntervention(null, ofA.id)).toBeNull();
        expect((await store.listInterventions(b.id, { limit: 10 })).data).toEqual([]);
        expect(await store.deleteIntervention(b.id, ofA.id)).toBe(false);
        expect(await store.deleteIntervention(null, ofA.id)).toBe(false);
        expect((await rejection(store.putIntervention(newIv(b.id, 'secret'), ofA.id))).code).toBe('intervention_replace_missing');
        expect((await rejection(store.putIntervention(newIv(b.id, 'x'), '../../escape'))).code).toBe('intervention_replace_missing');
        // b may use the same name for its own.
        const ofB = await store.putIntervention(newIv(b.id, 'secret'));
        expect((await store.findIntervention(b.id, 'secret'))!.id).toBe(ofB.id);
        expect((await store.findIntervention(a.id, 'secret'))!.id).toBe(ofA.id);
        expect(await store.storedUsage(b.id)).toEqual(storedOnly(1, ofB.bytes));
        expect((await store.findIntervention(a.id, ofA.id))!.version).toBe(1);
      });

      it("shares tenant-less interventions; a tenant's own name wins", async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const shared = await store.putIntervention({ ...newIv(null, 'common'), source: 'shared' });
        const sharedOther = await store.putIntervention({ ...newIv(null, 'only-shared'), source: 'shared' });
        const own = await store.putIntervention(newIv(a.id, 'common'));

        expect((await store.findIntervention(a.id, 'common'))!.id).toBe(own.id);
        expect((await store.findIntervention(b.id, 'common'))!.id).toBe(shared.id);
        expect((await store.findIntervention(a.id, shared.id))!.id).toBe(shared.id); // by id, the shared one
        expect((await store.findIntervention(null, 'common'))!.id).toBe(shared.id);
        expect(await store.findIntervention(null, own.id)).toBeNull();

        const listA = await store.listInterventions(a.id, { limit: 10 });
        expect(listA.data.map((m) => m.id)).toEqual([shared.id, sharedOther.id, own.id]);
        const listShared = await store.listInterventions(null, { limit: 10 });
        expect(listShared.data.map((m) => m.id)).toEqual([shared.id, sharedOther.id]);

        // A tenant can't delete or replace a shared one; only a null (admin) caller can.
        expect(await store.deleteIntervention(a.id, shared.id)).toBe(false);
        expect((await rejection(store.putIntervention(newIv(a.id, 'common'), shared.id))).code).toBe('intervention_replace_missing');
        expect((await rejection(store.putIntervention(newIv(null, 'common')))).code).toBe('intervention_name_taken');
        expect(await store.deleteIntervention(null, shared.id)).toBe(true);
        expect(await store.findIntervention(b.id, 'common')).toBeNull();
        expect(await store.storedUsage(a.id)).toEqual(storedOnly(1, own.bytes));
      });

      it('rejects a duplicate name without replaceId, leaving nothing behind', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const first = await store.putIntervention(newIv(t.id, 'dup'));
        const before = await fx.blobs();
        const e = await rejection(store.putIntervention(newIv(t.id, 'dup')));
        expect(e.code).toBe('intervention_name_taken');
        expect(e.field).toBe('name');
        expect(await fx.blobs()).toEqual(before);
        expect((await store.listInterventions(t.id, { limit: 10 })).data.map((m) => m.id)).toEqual([first.id]);
        expect(await store.storedUsage(t.id)).toEqual(storedOnly(1, first.bytes));
        // And for an unknown tenant (foreign key): a not_found, again leaving nothing behind.
        expect((await rejection(store.putIntervention(newIv('ten_ghost', 'x')))).field).toBe('tenantId');
        expect(await fx.blobs()).toEqual(before);
      });

      it('replaces in place: same id, version + 1, new bytes, listener fired', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const changed: string[] = [];
        const off = store.onInterventionChanged((id) => changed.push(id));
        const v1 = await store.putIntervention(newIv(t.id, 'model', 100));
        const oldBlobs = await fx.blobs();
        expect(changed).toEqual([]);
        await sleep(5);

        const next = { ...newIv(t.id, 'model', 300), description: 'v2' };
        const v2 = await store.putIntervention(next, v1.id);
        expect(v2).toMatchObject({
          id: v1.id,
          version: 2,
          description: 'v2',
          createdAt: v1.createdAt,
          bytes: next.files.config.byteLength + 300,
        });
        expect(v2.updatedAt > v1.updatedAt).toBe(true);
        expect(v2.sha256).not.toBe(v1.sha256);
        expect(changed).toEqual([v1.id]); // at once, before the call returns
        const files = await store.readInterventionFiles(v1.id);
        expect(Buffer.from(files!.weights).equals(Buffer.from(next.files.weights))).toBe(true);
        const nowBlobs = await fx.blobs();
        if (nowBlobs !== null) {
          expect(nowBlobs).toHaveLength(2);
          expect(nowBlobs.some((n) => oldBlobs!.includes(n))).toBe(false);
        }
        expect(await store.storedUsage(t.id)).toEqual(storedOnly(1, v2.bytes));

        // Replacing into another intervention's name conflicts and keeps v2 whole.
        await store.putIntervention(newIv(t.id, 'other'));
        expect((await rejection(store.putIntervention(newIv(t.id, 'other'), v1.id))).code).toBe('intervention_name_taken');
        expect((await store.findIntervention(t.id, v1.id))!.version).toBe(2);
        expect(Buffer.from((await store.readInterventionFiles(v1.id))!.weights).equals(Buffer.from(next.files.weights))).toBe(true);
        await fx.expectBlobs(4);

        off();
        await store.putIntervention(newIv(t.id, 'model'), v1.id);
        await sleep(100); // a backend that also hears its own change from the database must not fire twice
        expect(changed).toEqual([v1.id]);
      });

      it('deletes the row and its files, and tells listeners', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const changed: string[] = [];
        store.onInterventionChanged((id) => changed.push(id));
        store.onInterventionChanged(() => {
          throw new Error('a broken listener does not break the store');
        });
        const keep = await store.putIntervention(newIv(t.id, 'keep'));
        const gone = await store.putIntervention(newIv(t.id, 'gone'));
        await fx.expectBlobs(4);
        expect(await store.deleteIntervention(t.id, gone.id)).toBe(true);
        expect(changed).toEqual([gone.id]);
        expect(await store.deleteIntervention(t.id, gone.id)).toBe(false);
        expect(await store.findIntervention(t.id, gone.id)).toBeNull();
        expect(await store.readInterventionFiles(gone.id)).toBeNull();
        await fx.expectBlobs(2);
        expect(await store.readInterventionFiles(keep.id)).not.toBeNull();
        expect(await store.storedUsage(t.id)).toEqual(storedOnly(1, keep.bytes));
        await sleep(100);
        expect(changed).toEqual([gone.id]); // exactly once
      });

      it('pages in creation order with a cursor, scoped to the tenant', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const mine = [];
        for (let i = 0; i < 5; i++) {
          mine.push((await store.putIntervention(newIv(a.id, `a${i}`))).id);
          await store.putIntervention(newIv(b.id, `b${i}`));
        }
        for (const limit of [1, 2, 5, 100]) {
          const all = await collect((after) => store.listInterventions(a.id, { limit, after }));
          expect(all.map((m) => m.id)).toEqual(mine);
        }
        // Another tenant's id is no cursor for me.
        const ofB = (await store.listInterventions(b.id, { limit: 1 })).data[0].id;
        expect((await rejection(store.listInterventions(a.id, { limit: 2, after: ofB }))).code).toBe('cursor_unknown');
      });

      it('reads whole versions when a replace races reads', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const first = newIv(t.id, 'race', 200_000);
        const v1 = await store.putIntervention(first);
        const reads = Array.from({ length: 20 }, () => store.readInterventionFiles(v1.id));
        const next = newIv(t.id, 'race', 200_000);
        await store.putIntervention(next, v1.id);
        for (const r of await Promise.all(reads)) {
          expect(r).not.toBeNull();
          // Never the config of one version with the weights of the other.
          const isFirst = Buffer.from(r!.weights).equals(Buffer.from(first.files.weights));
          const isNext = Buffer.from(r!.weights).equals(Buffer.from(next.files.weights));
          expect(isFirst || isNext).toBe(true);
        }
        const after = await store.readInterventionFiles(v1.id);
        expect(Buffer.from(after!.weights).equals(Buffer.from(next.files.weights))).toBe(true);
      });
    });

    describe('compositions', () => {
      /** A composition of the given interventions, each with a strength. */
      const comp = (tenantId: string | null, name: string, ...ids: string[]) => ({
        tenantId,
        name,
        items: ids.map((intervention, i) => ({ intervention, strength: i + 0.5, layers: [i], positions: 'l1' })),
      });

      it('saves, finds by id and by name, pages, replaces in place and deletes', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const [x, y] = [await store.putIntervention(newIv(t.id, 'x')), await store.putIntervention(newIv(t.id, 'y'))];
        const c = await store.putComposition(comp(t.id, 'mix', x.id, y.id));
        expect(c.id).toMatch(/^comp_[0-9a-f]{24}$/);
        expect(c).toMatchObject({ tenantId: t.id, name: 'mix', items: comp(t.id, 'mix', x.id, y.id).items });
        expect(new Date(c.createdAt).toISOString()).toBe(c.createdAt);
        expect(c.updatedAt).toBe(c.createdAt);
        expect(await store.findComposition(t.id, c.id)).toEqual(c);
        expect(await store.findComposition(t.id, 'mix')).toEqual(c);
        expect(await store.findComposition(t.id, 'other')).toBeNull();
        expect(await store.findIntervention(t.id, c.id)).toBeNull(); // a composition id is never an intervention's

        const made = [c.id];
        for (let i = 0; i < 4; i++) made.push((await store.putComposition(comp(t.id, `c${i}`, y.id))).id);
        for (const limit of [1, 2, 5, 100]) {
          expect((await collect((after) => store.listCompositions(t.id, { limit, after }))).map((m) => m.id)).toEqual(made);
        }
        expect((await rejection(store.listCompositions(t.id, { limit: 2, after: 'comp_nope' }))).field).toBe('after');

        await sleep(5);
        const replaced = await store.putComposition(comp(t.id, 'mix 2', y.id), c.id);
        expect(replaced).toMatchObject({ id: c.id, name: 'mix 2', createdAt: c.createdAt, items: comp(t.id, '', y.id).items });
        expect(replaced.updatedAt > c.updatedAt).toBe(true);
        expect(await store.findComposition(t.id, 'mix')).toBeNull();
        expect(await store.findComposition(t.id, 'mix 2')).toEqual(replaced);
        for (const taken of [store.putComposition(comp(t.id, 'c0', y.id)), store.putComposition(comp(t.id, 'c0', y.id), c.id)]) {
          const e = await rejection(taken);
          expect([e.code, e.category, e.field]).toEqual(['composition_name_taken', 'conflict', 'name']);
        }
        expect(await store.findComposition(t.id, c.id)).toEqual(replaced);
        for (const missing of [`comp_${'0'.repeat(24)}`, '../../escape', x.id]) {
          const e = await rejection(store.putComposition(comp(t.id, 'new', y.id), missing));
          expect([e.code, e.field]).toEqual(['composition_replace_missing', 'id']);
        }

        expect(await store.deleteComposition(t.id, c.id)).toBe(true);
        expect(await store.deleteComposition(t.id, c.id)).toBe(false);
        expect(await store.findComposition(t.id, c.id)).toBeNull();
        expect((await store.listCompositions(t.id, { limit: 10 })).data.map((m) => m.id)).toEqual(made.slice(1));
        expect(await store.findIntervention(t.id, x.id)).toEqual(x);
      });

      it('keeps tenants apart, shares tenant-less ones, and uses only interventions the tenant can see', async () => {
        const store = await open();
        const [a, b] = [await store.createTenant('a'), await store.createTenant('b')];
        const ofA = await store.putIntervention(newIv(a.id, 'x'));
        const ofB = await store.putIntervention(newIv(b.id, 'x'));
        const shared = await store.putIntervention({ ...newIv(null, 'common'), source: 'shared' });
        const mine = await store.putComposition(comp(a.id, 'secret', ofA.id, shared.id));

        expect(await store.findComposition(b.id, mine.id)).toBeNull();
        expect(await store.findComposition(b.id, 'secret')).toBeNull();
        expect(await store.findComposition(null, mine.id)).toBeNull();
        expect((await store.listCompositions(b.id, { limit: 10 })).data).toEqual([]);
        expect(await store.deleteComposition(b.id, mine.id)).toBe(false);
        expect(await store.deleteComposition(null, mine.id)).toBe(false);
        expect(await store.deleteIntervention(b.id, ofA.id)).toBe(false); // in use, but not b's to know
        expect((await rejection(store.putComposition(comp(b.id, 'secret', ofB.id), mine.id))).code).toBe('composition_replace_missing');
        expect((await rejection(store.listCompositions(b.id, { limit: 1, after: mine.id }))).code).toBe('cursor_unknown');

        // Another tenant's intervention, or none, is not found on the item naming it; nothing is saved.
        for (const [items, at] of [
          [[shared.id, ofA.id], 1],
          [['iv_missing'], 0],
        ] as const) {
          const e = await rejection(store.putComposition(comp(b.id, 'theirs', ...items)));
          expect([e.code, e.field]).toEqual(['intervention_not_found', `items[${at}].intervention`]);
        }
        expect((await rejection(store.putComposition(comp('ten_ghost', 'x', shared.id)))).field).toBe('tenantId');
        expect(await store.findComposition(b.id, 'theirs')).toBeNull();

        // b may use the name too; a shared composition (of shared interventions only) is seen by all, a tenant's own name wins.
        const ofBComp = await store.putComposition(comp(b.id, 'secret', ofB.id));
        const common = await store.putComposition(comp(null, 'secret', shared.id));
        expect((await rejection(store.putComposition(comp(null, 'with a tenant one', ofA.id)))).code).toBe('intervention_not_found');
        expect((await store.findComposition(a.id, 'secret'))!.id).toBe(mine.id);
        expect((await store.findComposition(b.id, 'secret'))!.id).toBe(ofBComp.id);
        expect((await store.findComposition(a.id, common.id))!.id).toBe(common.id);
        expect((await store.findComposition(null, 'secret'))!.id).toBe(common.id);
        expect((await store.listCompositions(a.id, { limit: 10 })).data.map((c) => c.id)).toEqual([mine.id, common.id]);
        expect((await store.listCompositions(null, { limit: 10 })).data.map((c) => c.id)).toEqual([common.id]);
        expect(await store.deleteComposition(a.id, common.id)).toBe(false);
        expect(await store.deleteComposition(null, common.id)).toBe(true);
      });

      it('refuses to delete an intervention a composition uses, naming the compositions; the intervention stays whole', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const [x, y] = [await store.putIntervention(newIv(t.id, 'x')), await store.putIntervention(newIv(t.id, 'y'))];
        const shared = await store.putIntervention({ ...newIv(null, 'common'), source: 'shared' });
        const first = await store.putComposition(comp(t.id, 'first', x.id, y.id, x.id));
        await store.putComposition(comp(t.id, 'second', x.id, shared.id));
        const changed: string[] = [];
        store.onInterventionChanged((id) => changed.push(id));
        const blobs = await fx.blobs();

        const e = await rejection(store.deleteIntervention(t.id, x.id));
        expect([e.code, e.category, e.status, e.field]).toEqual(['intervention_in_use', 'conflict', 409, 'id']);
        expect(e.message).toContain('"first", "second"');
        expect((await rejection(store.deleteIntervention(null, shared.id))).message).toContain('"second"');
        expect(await store.findIntervention(t.id, x.id)).toEqual(x);
        expect(Buffer.from((await store.readInterventionFiles(x.id))!.weights).length).toBe(64);
        expect(await fx.blobs()).toEqual(blobs);
        expect(changed).toEqual([]);

        // Once no composition uses it (replaced without it, or deleted), it can go.
        await store.putComposition(comp(t.id, 'first', y.id), first.id);
        expect((await rejection(store.deleteIntervention(t.id, x.id))).message).not.toContain('"first"');
        expect(await store.deleteComposition(t.id, (await store.findComposition(t.id, 'second'))!.id)).toBe(true);
        expect(await store.deleteIntervention(t.id, x.id)).toBe(true);
        expect(await store.deleteIntervention(null, shared.id)).toBe(true);
        expect((await rejection(store.deleteIntervention(t.id, y.id))).code).toBe('intervention_in_use');
        expect(changed).toEqual([x.id, shared.id]);
      });

      it('never lets a delete and a composition using the same intervention both succeed', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        for (let round = 0; round < 10; round++) {
          const iv = await store.putIntervention(newIv(t.id, `iv${round}`));
          const [put, del] = await Promise.allSettled([
            store.putComposition(comp(t.id, `c${round}`, iv.id)),
            store.deleteIntervention(t.id, iv.id),
          ]);
          const found = await store.findIntervention(t.id, iv.id);
          if (put.status === 'fulfilled') {
            expect(del.status === 'rejected' && (del.reason as ReftError).code).toBe('intervention_in_use');
            expect(found).toEqual(iv);
          } else {
            expect((put.reason as ReftError).code).toBe('intervention_not_found');
            expect(del).toEqual({ status: 'fulfilled', value: true });
            expect(found).toBeNull();
          }
        }
      });

      it("goes with its tenant: deleting a tenant deletes its compositions, not another's", async () => {
        const store = await open();
        const [t, other] = [await store.createTenant('doomed'), await store.createTenant('kept')];
        const shared = await store.putIntervention({ ...newIv(null, 'common'), source: 'shared' });
        const gone = await store.putComposition(comp(t.id, 'doomed mix', (await store.putIntervention(newIv(t.id, 'x'))).id, shared.id));
        const kept = await store.putComposition(comp(other.id, 'mix', shared.id));
        expect(await store.deleteTenant(t.id)).toBe(true);
        expect(await store.findComposition(t.id, gone.id)).toBeNull();
        expect(await store.findComposition(other.id, 'mix')).toEqual(kept);
        const inUse = (await rejection(store.deleteIntervention(null, shared.id))).message;
        expect([inUse.includes('"mix"'), inUse.includes('doomed')]).toEqual([true, false]);
        expect(await store.deleteComposition(other.id, kept.id)).toBe(true);
        expect(await store.deleteIntervention(null, shared.id)).toBe(true); // nothing uses it any more
      });
    });

    describe('training data files', () => {
      it('stores, reads, pages and deletes files per tenant', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const data = bytes(10_000);
        const f = await store.putFile(a.id, 'train.jsonl', 'fine-tune', data);
        expect(f).toMatchObject({ tenantId: a.id, filename: 'train.jsonl', purpose: 'fine-tune', bytes: 10_000 });
        expect(f.id).toMatch(/^file_[0-9a-f]{24}$/);
        expect(await store.getFile(a.id, f.id)).toEqual(f);
        expect(Buffer.from((await store.readFile(a.id, f.id))!).equals(Buffer.from(data))).toBe(true);

        expect(await store.getFile(b.id, f.id)).toBeNull();
        expect(await store.readFile(b.id, f.id)).toBeNull();
        expect(await store.deleteFile(b.id, f.id)).toBe(false);
        expect((await store.listFiles(b.id, { limit: 10 })).data).toEqual([]);

        const more = [f.id];
        for (let i = 0; i < 4; i++) more.push((await store.putFile(a.id, `f${i}`, 'fine-tune', bytes(10))).id);
        expect((await collect((after) => store.listFiles(a.id, { limit: 2, after }))).map((x) => x.id)).toEqual(more);

        await fx.expectBlobs(5);
        expect(await store.deleteFile(a.id, f.id)).toBe(true);
        expect(await store.deleteFile(a.id, f.id)).toBe(false);
        expect(await store.readFile(a.id, f.id)).toBeNull();
        await fx.expectBlobs(4);
        expect((await rejection(store.putFile('ten_ghost', 'x', 'p', bytes(3)))).code).toBe('tenant_not_found');
        await fx.expectBlobs(4);
      });
    });

    describe('training jobs', () => {
      it('creates, scopes, lists and wakes listeners', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        let woken = 0;
        store.onJobQueued(() => woken++);
        const job = await store.createJob(a.id, { recipe: 'loreft', data: 'file_x' });
        expect(job).toMatchObject({
          tenantId: a.id,
          status: 'queued',
          spec: { recipe: 'loreft', data: 'file_x' },
          progress: null,
          error: null,
          interventionId: null,
          attempts: 0,
          cancelRequested: false,
          startedAt: null,
          finishedAt: null,
        });
        expect(job.id).toMatch(/^job_[0-9a-f]{24}$/);
        expect(woken).toBe(1);
        expect(await store.getJob(a.id, job.id)).toEqual(job);
        expect(await store.getJob(null, job.id)).toEqual(job);
        expect(await store.getJob(b.id, job.id)).toBeNull();
        expect(await store.requestCancel(b.id, job.id)).toBeNull();
        expect((await store.listJobs(b.id, { limit: 10 })).data).toEqual([]);
        const ids = [job.id];
        for (let i = 0; i < 4; i++) ids.push((await store.createJob(a.id, { i })).id);
        expect((await collect((after) => store.listJobs(a.id, { limit: 3, after }))).map((j) => j.id)).toEqual(ids);
        expect((await rejection(store.createJob('ten_ghost', {}))).code).toBe('tenant_not_found');
        await sleep(100);
        expect(woken).toBe(5); // once per job, however the backend also hears about it
      });

      it('lists jobs newest first with order desc, the cursor then meaning "older than"', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const ids: string[] = [];
        for (let i = 0; i < 5; i++) ids.push((await store.createJob(a.id, { i })).id);
        await store.createJob(b.id, {});
        const newest = [...ids].reverse();
        const first = await store.listJobs(a.id, { limit: 2, order: 'desc' });
        expect(first.data.map((j) => j.id)).toEqual(newest.slice(0, 2));
        expect(first.nextCursor).toBe(newest[1]);
        expect((await collect((after) => store.listJobs(a.id, { limit: 2, after, order: 'desc' }))).map((j) => j.id)).toEqual(newest);
        expect((await store.listJobs(a.id, { limit: 10, after: ids[0], order: 'desc' })).data).toEqual([]);
        expect((await store.listJobs(a.id, { limit: 10, order: 'asc' })).data.map((j) => j.id)).toEqual(ids);
        const err = await rejection(store.listJobs(b.id, { limit: 2, after: ids[2], order: 'desc' }));
        expect([err.code, err.field]).toEqual(['cursor_unknown', 'after']);
      });

      it('claims oldest first; only the lease holder may renew, report, checkpoint and finish', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const first = await store.createJob(t.id, { n: 1 });
        const second = await store.createJob(t.id, { n: 2 });

        const c1 = await store.claimJob('w1', 60_000, 3);
        expect(c1!.job).toMatchObject({ id: first.id, status: 'running', attempts: 1 });
        expect(c1!.job.startedAt).not.toBeNull();
        expect(c1!.lease).toMatchObject({ jobId: first.id, workerId: 'w1' });
        expect(c1!.lease.expiresAt).toBeGreaterThan(Date.now() + 59_000);
        const c2 = await store.claimJob('w2', 60_000, 3);
        expect(c2!.job.id).toBe(second.id);
        expect(await store.claimJob('w3', 60_000, 3)).toBeNull();

        expect(await store.renewLease(first.id, 'w2', 60_000)).toBe(false);
        expect(await store.renewLease(first.id, 'w1', 60_000)).toBe(true);
        expect(await store.updateProgress(first.id, 'w2', { step: 9 })).toBe(false);
        expect(await store.updateProgress(first.id, 'w1', { step: 10, loss: 0.5 })).toBe(true);
        expect((await store.getJob(null, first.id))!.progress).toEqual({ step: 10, loss: 0.5 });

        expect(await store.loadCheckpoint(first.id)).toBeNull();
        expect(await store.saveCheckpoint(first.id, 'w2', 5, bytes(10))).toBe(false);
        await fx.expectBlobs(0);
        const s1 = bytes(4000);
        expect(await store.saveCheckpoint(first.id, 'w1', 5, s1)).toBe(true);
        const s2 = bytes(5000);
        expect(await store.saveCheckpoint(first.id, 'w1', 10, s2)).toBe(true);
        const ck = await store.loadCheckpoint(first.id);
        expect(ck!.step).toBe(10);
        expect(Buffer.from(ck!.state).equals(Buffer.from(s2))).toBe(true);
        await fx.expectBlobs(1); // the older checkpoint's blob is gone

        const iv = await store.putIntervention({ ...newIv(t.id, 'trained'), source: 'training' });
        expect(await store.finishJob(first.id, 'w2', { status: 'failed', error: 'nope' })).toBe(false);
        const dangling = await rejection(store.finishJob(first.id, 'w1', { status: 'succeeded', interventionId: 'iv_gone' }));
        expect(dangling.field).toBe('interventionId');
        expect((await store.getJob(t.id, first.id))!.status).toBe('running');
        expect(await store.finishJob(first.id, 'w1', { status: 'succeeded', interventionId: iv.id })).toBe(true);
        expect(await store.finishJob(first.id, 'w1', { status: 'failed', error: 'again' })).toBe(false);
        const done = await store.getJob(t.id, first.id);
        expect(done).toMatchObject({ status: 'succeeded', interventionId: iv.id, error: null });
        expect(done!.finishedAt).not.toBeNull();
        expect(await store.renewLease(first.id, 'w1', 60_000)).toBe(false);
        expect(await store.saveCheckpoint(first.id, 'w1', 11, bytes(3))).toBe(false);

        expect(await store.finishJob(second.id, 'w2', { status: 'failed', error: 'out of memory' })).toBe(true);
        expect(await store.getJob(t.id, second.id)).toMatchObject({ status: 'failed', error: 'out of memory' });

        // Deleting the intervention a job produced leaves the job, without the reference.
        await store.deleteIntervention(t.id, iv.id);
        expect((await store.getJob(t.id, first.id))!.interventionId).toBeNull();
      });

      it('claims fairly between tenants: the tenant served longest ago (or never) first, then its oldest job', async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const many: string[] = [];
        for (let i = 0; i < 5; i++) many.push((await store.createJob(a.id, { i })).id);
        const finish = async (c: { job: { id: string } } | null, worker: string) => {
          expect(await store.finishJob(c!.job.id, worker, { status: 'failed', error: 'done' })).toBe(true);
          return c!.job.id;
        };
        expect(await finish(await store.claimJob('w1', 60_000, 3), 'w1')).toBe(many[0]);
        const other = await store.createJob(b.id, {});
        await sleep(5); // a later start time than a's first, on every clock
        // a was served, b never: b's one job goes before a's older ones
        expect(await finish(await store.claimJob('w1', 60_000, 3), 'w1')).toBe(other.id);
        const more = await store.createJob(b.id, {});
        await sleep(5);
        // now a was served longest ago
        expect(await finish(await store.claimJob('w1', 60_000, 3), 'w1')).toBe(many[1]);
        await sleep(5);
        expect(await finish(await store.claimJob('w1', 60_000, 3), 'w1')).toBe(more.id);
        expect(await finish(await store.claimJob('w1', 60_000, 3), 'w1')).toBe(many[2]);
      });

      it('counts training files, their bytes and unfinished jobs in storedUsage', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const other = await store.createTenant('b');
        const file = await store.putFile(t.id, 'a.jsonl', 'fine-tune', bytes(300));
        await store.putFile(t.id, 'b.jsonl', 'fine-tune', bytes(200));
        await store.putFile(other.id, 'c.jsonl', 'fine-tune', bytes(999));
        const queued = await store.createJob(t.id, {});
        await store.createJob(t.id, {});
        await store.createJob(other.id, {});
        expect(await store.storedUsage(t.id)).toEqual({ interventions: 0, bytes: 0, files: 2, fileBytes: 500, activeJobs: 2 });
        await store.requestCancel(t.id, queued.id);
        await store.deleteFile(t.id, file.id);
        expect(await store.storedUsage(t.id)).toEqual({ interventions: 0, bytes: 0, files: 1, fileBytes: 200, activeJobs: 1 });
      });

      it('lets another worker take a job whose lease expired; the old holder is locked out', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const job = await store.createJob(t.id, {});
        await store.claimJob('w1', 300, 3);
        expect(await store.claimJob('w2', 60_000, 3)).toBeNull();
        await sleep(350);
        const again = await store.claimJob('w2', 60_000, 3);
        expect(again!.job).toMatchObject({ id: job.id, attempts: 2, status: 'running' });
        expect(await store.renewLease(job.id, 'w1', 60_000)).toBe(false);
        expect(await store.updateProgress(job.id, 'w1', {})).toBe(false);
        expect(await store.saveCheckpoint(job.id, 'w1', 1, bytes(3))).toBe(false);
        expect(await store.finishJob(job.id, 'w1', { status: 'cancelled' })).toBe(false);
        expect(await store.finishJob(job.id, 'w2', { status: 'cancelled' })).toBe(true);
        expect((await store.getJob(null, job.id))!.status).toBe('cancelled');
      });

      it('fails a job instead of claiming it past maxAttempts', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const job = await store.createJob(t.id, {});
        const later = await store.createJob(t.id, {});
        expect((await store.claimJob('w1', 1, 2))!.job.id).toBe(job.id);
        await sleep(10);
        expect((await store.claimJob('w2', 1, 2))!.job).toMatchObject({ id: job.id, attempts: 2 });
        await sleep(10);
        // The third claim gives up on `job` and takes the next one in the same call.
        const third = await store.claimJob('w3', 60_000, 2);
        expect(third!.job.id).toBe(later.id);
        const failed = await store.getJob(null, job.id);
        expect(failed).toMatchObject({ status: 'failed', attempts: 2 });
        expect(failed!.error).toMatch(/2 attempt/);
        expect(failed!.finishedAt).not.toBeNull();
        const last = (await store.listJobEvents(job.id, 0, 100)).at(-1)!;
        expect(last).toMatchObject({ type: 'status', data: { status: 'failed' } });
      });

      it('cancels a queued job at once and never claims it; a running one is only flagged', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const queued = await store.createJob(t.id, { q: 1 });
        const running = await store.createJob(t.id, { q: 2 });

        const cancelled = await store.requestCancel(t.id, queued.id);
        expect(cancelled).toMatchObject({ status: 'cancelled', cancelRequested: true });
        expect(cancelled!.finishedAt).not.toBeNull();
        const claim = await store.claimJob('w1', 60_000, 3);
        expect(claim!.job.id).toBe(running.id);
        expect(await store.claimJob('w2', 60_000, 3)).toBeNull();

        const flagged = await store.requestCancel(t.id, running.id);
        expect(flagged).toMatchObject({ status: 'running', cancelRequested: true, finishedAt: null });
        expect(await store.finishJob(running.id, 'w1', { status: 'cancelled' })).toBe(true);
        expect(await store.getJob(t.id, running.id)).toMatchObject({ status: 'cancelled' });
        // Cancelling a finished job changes nothing.
        expect(await store.requestCancel(t.id, running.id)).toMatchObject({ status: 'cancelled' });
      });

      it('cancels rather than retries a flagged job whose worker died', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const job = await store.createJob(t.id, {});
        await store.claimJob('w1', 20, 3);
        await store.requestCancel(t.id, job.id);
        await sleep(40);
        expect(await store.claimJob('w2', 60_000, 3)).toBeNull();
        expect(await store.getJob(null, job.id)).toMatchObject({ status: 'cancelled', attempts: 1 });
      });

      it('numbers events per job in order, pages them, and records status changes', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const j1 = await store.createJob(t.id, {});
        const j2 = await store.createJob(t.id, {});
        await store.claimJob('w', 60_000, 3);
        for (let i = 0; i < 5; i++) {
          await store.appendJobEvent(j1.id, 'metrics', { step: i });
          await store.appendJobEvent(j2.id, 'log', { line: `l${i}` });
        }
        await store.finishJob(j1.id, 'w', { status: 'failed', error: 'boom' });

        const events = await store.listJobEvents(j1.id, 0, 100);
        expect(events.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
        expect(events.map((e) => e.type)).toEqual(['status', 'status', 'metrics', 'metrics', 'metrics', 'metrics', 'metrics', 'status']);
        expect(events[0].data).toEqual({ status: 'queued' });
        expect(events[1].data).toEqual({ status: 'running', attempt: 1 });
        expect(events[4]).toMatchObject({ jobId: j1.id, type: 'metrics', data: { step: 2 } });
        expect(events[7].data).toEqual({ status: 'failed', error: 'boom' });

        const page = await store.listJobEvents(j1.id, 3, 2);
        expect(page.map((e) => e.seq)).toEqual([4, 5]);
        expect(await store.listJobEvents(j1.id, 8, 10)).toEqual([]);
        expect((await store.listJobEvents(j2.id, 0, 100)).map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6]);

        expect((await rejection(store.appendJobEvent('job_missing', 'log', {}))).code).toBe('job_not_found');
      });

      it('numbers concurrent appends to one job without gaps or duplicates', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const job = await store.createJob(t.id, {});
        await Promise.all(Array.from({ length: 30 }, (_, i) => store.appendJobEvent(job.id, 'log', { i })));
        const seqs = (await store.listJobEvents(job.id, 0, 100)).map((e) => e.seq);
        expect(seqs).toEqual(Array.from({ length: 31 }, (_, i) => i + 1));
      });
    });

    describe('usage accounting', () => {
      const day = (d: string, requests: number, promptTokens: number, completionTokens: number, trainingTokens: number) => ({
        day: d,
        requests,
        promptTokens,
        completionTokens,
        trainingTokens,
      });

      it('adds the counts up per tenant and day; days are separate', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        await store.recordUsage([usageOf(t.id, '2024-03-01', { requests: 1, promptTokens: 10, completionTokens: 20 })]);
        await store.recordUsage([
          usageOf(t.id, '2024-03-01', { requests: 2, promptTokens: 5, completionTokens: 7, trainingTokens: 100 }),
          usageOf(t.id, '2024-03-02', { requests: 1, promptTokens: 1, completionTokens: 1, trainingTokens: 1 }),
        ]);
        expect(await store.getUsage(t.id, '2024-03-01', '2024-03-31')).toEqual([
          day('2024-03-01', 3, 15, 27, 100),
          day('2024-03-02', 1, 1, 1, 1),
        ]);

        // The same tenant and day twice in one batch: both count.
        await store.recordUsage([
          usageOf(t.id, '2024-03-02', { requests: 1 }),
          usageOf(t.id, '2024-03-02', { requests: 1, trainingTokens: 9 }),
        ]);
        expect(await store.getUsage(t.id, '2024-03-02', '2024-03-02')).toEqual([day('2024-03-02', 3, 1, 1, 10)]);
        // Nothing to add makes no row; an empty batch is fine.
        await store.recordUsage([usageOf(t.id, '2024-03-05')]);
        await store.recordUsage([]);
        expect((await store.getUsage(t.id, '2024-03-01', '2024-03-31')).map((d) => d.day)).toEqual(['2024-03-01', '2024-03-02']);
        // Counters are 64-bit: sums past 2^31 are exact.
        await store.recordUsage([
          usageOf(t.id, '2024-03-03', { promptTokens: 2 ** 31 }),
          usageOf(t.id, '2024-03-03', { promptTokens: 2 ** 31 + 5 }),
        ]);
        expect(await store.getUsage(t.id, '2024-03-03', '2024-03-03')).toEqual([day('2024-03-03', 0, 2 ** 32 + 5, 0, 0)]);
        // The interventions usage is a different thing, and untouched.
        expect(await store.storedUsage(t.id)).toEqual(storedOnly(0, 0));
      });

      it('returns the days in an inclusive range, ascending', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const days = ['2024-02-29', '2023-12-31', '2024-03-01', '2024-01-01', '2024-01-15'];
        await store.recordUsage(days.map((d, i) => usageOf(t.id, d, { requests: i + 1 })));
        const requestsIn = async (from: string, to: string) => (await store.getUsage(t.id, from, to)).map((d) => [d.day, d.requests]);

        expect(await requestsIn('2000-01-01', '2099-12-31')).toEqual([
          ['2023-12-31', 2],
          ['2024-01-01', 4],
          ['2024-01-15', 5],
          ['2024-02-29', 1],
          ['2024-03-01', 3],
        ]);
        expect(await requestsIn('2024-01-01', '2024-02-29')).toEqual([
          ['2024-01-01', 4],
          ['2024-01-15', 5],
          ['2024-02-29', 1],
        ]);
        expect(await requestsIn('2024-01-02', '2024-02-28')).toEqual([['2024-01-15', 5]]);
        expect(await requestsIn('2024-03-01', '2024-03-01')).toEqual([['2024-03-01', 3]]);
        expect(await requestsIn('2024-04-01', '2024-04-30')).toEqual([]);
        expect(await requestsIn('2024-03-01', '2024-01-01')).toEqual([]); // from after to

        for (const bad of ['2024-02-30', '2024-1-01', 'yesterday', '']) {
          expect(await rejection(store.getUsage(t.id, bad, '2024-03-01'))).toMatchObject({ code: 'usage_range_invalid', field: 'from' });
          expect(await rejection(store.getUsage(t.id, '2024-01-01', bad))).toMatchObject({ code: 'usage_range_invalid', field: 'to' });
        }
      });

      it('skips unknown tenants silently, recording the rest of the batch', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        await store.recordUsage([
          usageOf(GHOST_TENANT, '2024-05-01', { requests: 7 }),
          usageOf(t.id, '2024-05-01', { requests: 1, completionTokens: 4 }),
          usageOf('not-even-an-id', '2024-05-01', { requests: 7 }),
        ]);
        await store.recordUsage([usageOf(GHOST_TENANT, '2024-05-02', { requests: 1 })]); // nothing known at all
        expect(await store.getUsage(t.id, '2024-05-01', '2024-05-31')).toEqual([day('2024-05-01', 1, 0, 4, 0)]);
        expect(await store.getUsage(GHOST_TENANT, '2024-05-01', '2024-05-31')).toEqual([]);
        // And no tenant appeared on the way.
        expect((await store.listTenants({ limit: 10 })).data).toEqual([t]);
      });

      it('refuses a batch with an invalid entry whole', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const good = usageOf(t.id, '2024-05-01', { requests: 1 });
        const cases: [UsageRecord, string][] = [
          [usageOf(t.id, '2024-13-01', { requests: 1 }), 'entries[1].day'],
          [usageOf(t.id, '2024-5-1', { requests: 1 }), 'entries[1].day'],
          [usageOf(t.id, '2024-05-01', { requests: -1 }), 'entries[1].requests'],
          [usageOf(t.id, '2024-05-01', { promptTokens: 1.5 }), 'entries[1].promptTokens'],
          [usageOf(t.id, '2024-05-01', { completionTokens: Number.NaN }), 'entries[1].completionTokens'],
          [usageOf(t.id, '2024-05-01', { trainingTokens: 2 ** 53 }), 'entries[1].trainingTokens'],
        ];
        for (const [bad, field] of cases) {
          expect(await rejection(store.recordUsage([good, bad]))).toMatchObject({ code: 'usage_record_invalid', field });
        }
        expect(await store.getUsage(t.id, '2024-01-01', '2024-12-31')).toEqual([]);
      });

      it("keeps tenants apart: one tenant's usage is never another's", async () => {
        const store = await open();
        const a = await store.createTenant('a');
        const b = await store.createTenant('b');
        const c = await store.createTenant('c');
        await store.recordUsage([
          usageOf(a.id, '2024-06-01', { requests: 1, promptTokens: 100 }),
          usageOf(b.id, '2024-06-01', { requests: 5, promptTokens: 7 }),
          usageOf(b.id, '2024-06-02', { requests: 2 }),
        ]);
        expect(await store.getUsage(a.id, '2024-06-01', '2024-06-30')).toEqual([day('2024-06-01', 1, 100, 0, 0)]);
        expect(await store.getUsage(b.id, '2024-06-01', '2024-06-30')).toEqual([
          day('2024-06-01', 5, 7, 0, 0),
          day('2024-06-02', 2, 0, 0, 0),
        ]);
        expect(await store.getUsage(c.id, '2024-06-01', '2024-06-30')).toEqual([]);
      });

      it('keeps usage across a reopen, and goes on adding to it', async () => {
        const first = await open();
        const t = await first.createTenant('a');
        await first.recordUsage([usageOf(t.id, '2024-07-01', { requests: 2, promptTokens: 3, completionTokens: 4, trainingTokens: 5 })]);
        await first.close();

        const again = await open();
        expect(await again.getUsage(t.id, '2024-07-01', '2024-07-01')).toEqual([day('2024-07-01', 2, 3, 4, 5)]);
        await again.recordUsage([usageOf(t.id, '2024-07-01', { requests: 1, promptTokens: 1, completionTokens: 1, trainingTokens: 1 })]);
        expect(await again.getUsage(t.id, '2024-07-01', '2024-07-01')).toEqual([day('2024-07-01', 3, 4, 5, 6)]);
      });

      it('migrates storage at schema version 1 (before usage) on open, keeping its data', async () => {
        const old = await fx.openAt(1);
        expect(await backend.schemaVersions(fx.location)).toEqual([1]);
        const t = await old.createTenant('from v1');
        const iv = await old.putIntervention(newIv(t.id, 'old'));
        const job = await old.createJob(t.id, { from: 'v1' });
        await old.close();

        const store = await open();
        expect(await backend.schemaVersions(fx.location)).toEqual([1, 2, 3, 4]);
        expect(await store.getTenant(t.id)).toEqual(t);
        expect(await store.findIntervention(t.id, 'old')).toEqual(iv);
        expect(await store.getJob(t.id, job.id)).toEqual(job);
        await store.recordUsage([usageOf(t.id, '2024-08-01', { requests: 1, trainingTokens: 64 })]);
        expect(await store.getUsage(t.id, '2024-08-01', '2024-08-01')).toEqual([day('2024-08-01', 1, 0, 0, 64)]);
        await store.close();
        // Opening again changes nothing; a server that only knows version 1 now refuses it.
        await open();
        expect(await backend.schemaVersions(fx.location)).toEqual([1, 2, 3, 4]);
        await expect(backend.openAt(fx.location, 1)).rejects.toThrow(/schema version 4, newer than this server's 1/);
      });
    });

    describe('persistence', () => {
      it('keeps everything across a reopen', async () => {
        const first = await open();
        const t = await first.createTenant('a');
        const key = await first.createApiKey(t.id, 'h');
        const iv = newIv(t.id, 'kept', 1234);
        const meta = await first.putIntervention(iv);
        const file = await first.putFile(t.id, 'd.jsonl', 'fine-tune', bytes(50));
        const job = await first.createJob(t.id, { a: 1 });
        const claim = await first.claimJob('w', 60_000, 3);
        const state = bytes(99);
        await first.saveCheckpoint(job.id, 'w', 7, state);
        await first.appendJobEvent(job.id, 'log', { hi: 1 });
        await first.close();

        const again = await open();
        expect(await again.getTenant(t.id)).toEqual(t);
        expect(await again.findApiKey('h')).toEqual({ key, tenant: t });
        expect(await again.findIntervention(t.id, 'kept')).toEqual(meta);
        expect(Buffer.from((await again.readInterventionFiles(meta.id))!.weights).equals(Buffer.from(iv.files.weights))).toBe(true);
        expect(await again.getFile(t.id, file.id)).toEqual(file);
        expect(await again.getJob(t.id, job.id)).toEqual(claim!.job);
        // The lease survives too: the same worker can go on after a restart of its store.
        expect(await again.renewLease(job.id, 'w', 60_000)).toBe(true);
        const ck = await again.loadCheckpoint(job.id);
        expect(ck!.step).toBe(7);
        expect(Buffer.from(ck!.state).equals(Buffer.from(state))).toBe(true);
        expect((await again.listJobEvents(job.id, 0, 10)).map((e) => e.type)).toEqual(['status', 'status', 'log']);
        await fx.expectBlobs(4);
      });
    });

    describe('several processes', () => {
      it('migrate the same new storage at once', async () => {
        const results = await Promise.all([0, 1, 2].map(() => runChild(backend.name, fx.location, ['open'])));
        for (const r of results) expect(r.code, r.stderr).toBe(0);
        const store = await open();
        const tenants = (await store.listTenants({ limit: 10 })).data.map((t) => t.id);
        expect(tenants.sort()).toEqual(results.map((r) => lastJson<{ tenant: string }>(r).tenant).sort());
      });

      it('add usage at the same time without losing an increment', async () => {
        const store = await open();
        const tenants = [(await store.createTenant('a')).id, (await store.createTenant('b')).id];
        const days = ['2024-09-01', '2024-09-02'];
        const processes = 4;
        const calls = 50;
        const plan = JSON.stringify({ tenants, days, calls, ghost: GHOST_TENANT });
        const { path, open: opener } = STORE_MODULES[backend.name];

        // Every writer waits for "go" until all have opened the store, so they write at the same time.
        const senders: ((line: string) => void)[] = [];
        const onLine = (line: string, send: (line: string) => void) => {
          if (line !== 'ready') return;
          senders.push(send);
          if (senders.length === processes) for (const s of senders) s('go');
        };
        const results = await Promise.all(
          Array.from({ length: processes }, () => runScript(USAGE_WRITER, [moduleUrl(path), opener, fx.location, plan], { onLine })),
        );
        for (const r of results) {
          expect(r.code, r.stderr).toBe(0);
          expect(lastJson(r)).toEqual({ done: calls });
        }

        const n = processes * calls;
        const promptTokens = processes * ((calls * (calls + 1)) / 2); // call i adds i + 1
        for (const t of tenants) {
          expect(await store.getUsage(t, days[0], days[1])).toEqual(
            days.map((d) => ({ day: d, requests: n, promptTokens, completionTokens: 2 * n, trainingTokens: 3 * n })),
          );
        }
        expect(await store.getUsage(GHOST_TENANT, days[0], days[1])).toEqual([]);
      });

      it('claim each job exactly once', async () => {
        const store = await open();
        const t = await store.createTenant('a');
        const ids: string[] = [];
        for (let i = 0; i < 40; i++) ids.push((await store.createJob(t.id, { i })).id);

        // Every worker waits for "go" until all have opened the store, so they claim at the same time.
        const workers = ['w1', 'w2', 'w3'];
        const senders: ((line: string) => void)[] = [];
        const onLine = (line: string, send: (line: string) => void) => {
          if (line !== 'ready') return;
          senders.push(send);
          if (senders.length === workers.length) for (const s of senders) s('go');
        };
        const results = await Promise.all(workers.map((w) => runChild(backend.name, fx.location, ['claim', w], { onLine })));
        const claimedBy = new Map<string, string>();
        const all: string[] = [];
        results.forEach((r, i) => {
          expect(r.code, r.stderr).toBe(0);
          const claimed = lastJson<{ claimed: string[] }>(r).claimed;
          for (const id of claimed) claimedBy.set(id, workers[i]);
          all.push(...claimed);
        });
        expect(all.sort()).toEqual([...ids].sort()); // each exactly once
        // Two of three at least took part (a slow start can leave one worker nothing).
        expect(results.filter((r) => lastJson<{ claimed: string[] }>(r).claimed.length > 0).length).toBeGreaterThanOrEqual(2);

        for (const id of ids) {
          const job = await store.getJob(t.id, id);
          expect(job).toMatchObject({ status: 'failed', attempts: 1 });
          expect(job!.error).toBe(`done by ${claimedBy.get(id)}`);
        }
      });
    });
  });
}
