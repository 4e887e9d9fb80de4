import { mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { describe, expect, it } from 'vitest';
import { openSqliteStore } from '../src/storage/sqlite-store.ts';
import { newIv, runChild, storeContract, storedOnly, useStoreFixture } from './support/store-contract.ts';
import type { StoreBackend } from './support/store-contract.ts';

// Every test runs against a real SQLite file in a fresh temp directory.

const sqlite: StoreBackend = {
  name: 'sqlite',
  create: () => mkdtemp(join(tmpdir(), 'reft-store-')),
  open: (dir) => openSqliteStore(dir),
  openAt: (dir, schemaVersion) => openSqliteStore(dir, { schemaVersion }),
  schemaVersions: async (dir) => {
    const db = new Database(join(dir, 'reft.db'), { readonly: true });
    try {
      return (db.prepare('SELECT version FROM schema_migrations ORDER BY version').all() as { version: number }[]).map((r) => r.version);
    } finally {
      db.close();
    }
  },
  destroy: (dir) => rm(dir, { recursive: true, force: true }),
  blobs: (dir) => readdir(join(dir, 'blobs')),
};

storeContract(sqlite);

// ---------------------------------------------------------------------------------------------
// The blob directory: crash leftovers and their cleanup.
// ---------------------------------------------------------------------------------------------

describe('blob files', () => {
  const fx = useStoreFixture(sqlite);
  const open = () => fx.open();
  const blobs = async () => (await fx.blobs())!;

  it('cleans abandoned temp files and orphan blobs at open, and nothing else', async () => {
    const dir = fx.location;
    await (await openSqliteStore(dir)).close();
    const dead = (await runChild('sqlite', dir, ['noop'])).pid; // a pid that has exited
    const host = hostname();
    const names = {
      deadWriter: `tmp~${host}~${dead}~aaaa`,
      liveWriter: `tmp~${host}~${process.pid}~bbbb`,
      otherHostFresh: `tmp~elsewhere~1~cccc`,
      otherHostOld: `tmp~elsewhere~1~dddd`,
      orphan: `iv_${'a'.repeat(24)}.0123abcd.weights`,
      foreign: 'README',
    };
    for (const n of Object.values(names)) await writeFile(join(dir, 'blobs', n), 'x');
    const twoHoursAgo = new Date(Date.now() - 2 * 3600_000);
    await utimes(join(dir, 'blobs', names.otherHostOld), twoHoursAgo, twoHoursAgo);

    await open();
    expect(await blobs()).toEqual([names.foreign, names.liveWriter, names.otherHostFresh].sort());
  });

  it.each([
    ['blobs-written', /^tmp~/],
    ['blobs-renamed', /^iv_/],
  ] as const)('a process killed at %s leaves nothing visible, and its files are swept', async (point, leftover) => {
    const store = await open();
    const t = await store.createTenant('a');
    const result = await runChild('sqlite', fx.location, ['crash', point, '', t.id]);
    expect(result.signal, result.stderr).toBe('SIGKILL');
    expect(result.stdout).not.toContain('survived');
    // Proof that it died where intended: its files are there, under the expected names.
    const left = await blobs();
    expect(left).toHaveLength(2);
    for (const n of left) expect(n).toMatch(leftover);

    expect(await store.findIntervention(t.id, 'crashy')).toBeNull();
    expect(await store.storedUsage(t.id)).toEqual(storedOnly(0, 0));
    const reopened = await open();
    expect(await reopened.findIntervention(t.id, 'crashy')).toBeNull();
    expect(await blobs()).toEqual([]);
  });

  it('a process killed in the middle of a replace leaves the old version whole', async () => {
    const store = await open();
    const t = await store.createTenant('a');
    const iv = newIv(t.id, 'crashy', 500);
    const v1 = await store.putIntervention(iv);
    const before = await blobs();
    const result = await runChild('sqlite', fx.location, ['crash', 'blobs-renamed', v1.id, t.id]);
    expect(result.signal, result.stderr).toBe('SIGKILL');
    expect(await blobs()).toHaveLength(4);

    const reopened = await open();
    expect(await reopened.findIntervention(t.id, v1.id)).toEqual(v1);
    const files = await reopened.readInterventionFiles(v1.id);
    expect(Buffer.from(files!.weights).equals(Buffer.from(iv.files.weights))).toBe(true);
    expect(await blobs()).toEqual(before);
  });
});
