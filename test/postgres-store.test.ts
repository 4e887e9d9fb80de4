import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterEach, describe, expect, it } from 'vitest';
import { openPostgresStore } from '../src/storage/postgres-store.ts';
import type { Store } from '../src/storage/store.ts';
import { eventually, lastJson, newIv, rejection, runChild, sleep, storeContract, useStoreFixture } from './support/store-contract.ts';
import type { StoreBackend } from './support/store-contract.ts';
import { admin, createDatabase, dropDatabase } from './support/databases.ts';

// Every test runs against a fresh database, created (and dropped afterwards) through the role of
// REFT_TEST_DATABASE_URL, which needs CREATEDB. A missing server fails the tests: it is not a skip.

const postgres: StoreBackend = {
  name: 'postgres',
  create: createDatabase,
  open: (url) => openPostgresStore(url),
  destroy: dropDatabase,
};

storeContract(postgres);

// ---------------------------------------------------------------------------------------------

describe('postgres: several processes', () => {
  const fx = useStoreFixture(postgres);

  it("hears another process's replace, delete and queued job within a second; each process once", async () => {
    const store = await fx.open();
    const t = await store.createTenant('a');
    const replaced = await store.putIntervention(newIv(t.id, 'replaced'));
    const deleted = await store.putIntervention(newIv(t.id, 'deleted'));
    const heard: { id: string; at: number }[] = [];
    let woken = 0;
    store.onInterventionChanged((id) => heard.push({ id, at: Date.now() }));
    store.onJobQueued(() => woken++);

    let changedAt = 0;
    const result = await runChild('postgres', fx.location, ['change', t.id, replaced.id, deleted.id], {
      onLine: (line) => {
        if (line === 'changed') changedAt = Date.now();
      },
    });
    expect(result.code, result.stderr).toBe(0);
    // The child's own listeners fired once per change: at commit, and not again for the echo.
    expect(lastJson(result)).toEqual({ seen: [replaced.id, deleted.id], woken: 1 });
    // Ours, once each, within a second of the child reporting its changes done.
    expect(heard.map((h) => h.id)).toEqual([replaced.id, deleted.id]);
    for (const h of heard) expect(h.at - changedAt).toBeLessThan(1_000);
    expect(woken).toBe(1);
    expect((await store.findIntervention(t.id, replaced.id))!.version).toBe(2);
  });
});

describe('postgres: migrations', () => {
  const fx = useStoreFixture(postgres);

  it('lets several stores migrate one fresh database at the same moment', async () => {
    // In one process, so the opens overlap for sure (child processes start at staggered times).
    const stores = await Promise.all(Array.from({ length: 6 }, () => fx.open()));
    await Promise.all(stores.map((s, i) => s.createTenant(`t${i}`)));
    expect((await stores[0].listTenants({ limit: 10 })).data).toHaveLength(6);
    const versions = await pgQuery(fx.location, 'SELECT version FROM schema_migrations ORDER BY version');
    expect(versions.map((r) => r.version)).toEqual([1]);
  });
});

/** Rows of one query on the given database. */
async function pgQuery(url: string, sql: string): Promise<Record<string, unknown>[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query(sql)).rows;
  } finally {
    await client.end();
  }
}

// ---------------------------------------------------------------------------------------------
// A database restart under an open store. Stops and starts the server with Debian's
// pg_ctlcluster, so it needs the server on this machine and the rights to do that (root, as in CI).
// ---------------------------------------------------------------------------------------------

const run = promisify(execFile);

interface Server {
  stop(): Promise<void>;
  start(): Promise<void>;
  /** Starts the server if this test stopped it and did not start it again. */
  restore(): Promise<void>;
}

/** The Debian cluster ("15/main") serving the test database, from its cluster_name setting. */
async function testServer(): Promise<Server> {
  const name: string = await admin(async (c) => (await c.query('SHOW cluster_name')).rows[0].cluster_name);
  const match = /^(\d+)\/(\S+)$/.exec(name);
  if (!match) throw new Error(`cannot tell the server's cluster (cluster_name = "${name}"): the outage test needs a Debian cluster, see .ci/postgres.sh`);
  const [, version, cluster] = match;
  let stopped = false;
  const server: Server = {
    async stop() {
      stopped = true;
      await run('pg_ctlcluster', [version, cluster, 'stop', '-m', 'fast']);
    },
    async start() {
      await run('pg_ctlcluster', [version, cluster, 'start']);
      stopped = false;
    },
    async restore() {
      if (stopped) await server.start();
    },
  };
  return server;
}

describe('postgres: outage', () => {
  const fx = useStoreFixture(postgres);
  const extra: Store[] = [];
  let server: Server | undefined;
  // Runs before the fixture drops the database (after-hooks run in reverse order): even a test
  // that timed out mid-outage leaves a running server to the tests after it.
  afterEach(async () => {
    await server?.restore();
    for (const s of extra.splice(0)) await s.close();
  });

  it('fails fast with unavailable while the server is down, and recovers without a reopen', async () => {
    const background: string[] = [];
    const store = await openPostgresStore(fx.location, { log: (m) => background.push(m) });
    extra.push(store);
    const t = await store.createTenant('a');
    const iv = await store.putIntervention(newIv(t.id, 'watched'));
    const heard: string[] = [];
    store.onInterventionChanged((id) => heard.push(id));

    server = await testServer();
    await server.stop();
    try {
      for (const call of [() => store.getTenant(t.id), () => store.createTenant('b'), () => store.claimJob('w', 1000, 3)]) {
        const started = Date.now();
        const e = await rejection(call());
        expect(e.code).toBe('unavailable');
        expect(e.status).toBe(503);
        expect(e.retryAfterSeconds).toBeGreaterThan(0);
        expect(Date.now() - started).toBeLessThan(3_000);
      }
      await sleep(300); // the listener is retrying meanwhile
    } finally {
      // Whatever failed above, the server comes back for the tests after this one.
      await server.start();
    }

    // Queries work again on the same store.
    expect(await eventually(() => store.getTenant(t.id), 10_000, 100)).toEqual(t);
    expect((await store.createTenant('after')).name).toBe('after');

    // And so does NOTIFY: the listener reconnected and LISTENs again. Changes from another store
    // (another process, as far as the database can tell) until one is heard, in case the
    // listener's backoff has not come round yet.
    const other = await openPostgresStore(fx.location);
    extra.push(other);
    const started = Date.now();
    await eventually(
      async () => {
        if (!heard.includes(iv.id)) {
          await other.putIntervention(newIv(t.id, 'watched'), iv.id);
          await sleep(100);
        }
        expect(heard).toContain(iv.id);
      },
      10_000,
      0,
    );
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(background.some((m) => /LISTEN connection was lost/.test(m))).toBe(true);
    expect(background.some((m) => /LISTEN connection is back/.test(m))).toBe(true);
  });
});
