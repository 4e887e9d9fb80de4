import { afterEach, describe, expect, it } from 'vitest';
import { openPostgresStore } from '../src/storage/postgres-store.ts';
import type { Store } from '../src/storage/store.ts';
import {
  eventually,
  lastJson,
  newIv,
  rejection,
  runChild,
  sleep,
  storeContract,
  usageOf,
  useStoreFixture,
} from './support/store-contract.ts';
import type { StoreBackend } from './support/store-contract.ts';
import { createDatabase, dropDatabase, pgQuery, postgresServer, type PostgresServer } from './support/databases.ts';

// Every test runs against a fresh database, created (and dropped afterwards) through the role of
// REFT_TEST_DATABASE_URL, which needs CREATEDB. A missing server fails the tests: it is not a skip.

const postgres: StoreBackend = {
  name: 'postgres',
  create: createDatabase,
  open: (url) => openPostgresStore(url),
  openAt: (url, schemaVersion) => openPostgresStore(url, { schemaVersion }),
  schemaVersions: async (url) =>
    (await pgQuery(url, 'SELECT version FROM schema_migrations ORDER BY version')).map((r) => Number(r.version)),
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
    expect(versions.map((r) => r.version)).toEqual([1, 2, 3, 4]);
  });
});

describe('postgres: usage accounting', () => {
  const fx = useStoreFixture(postgres);

  it('loses no increment when several stores each run all their calls at once', async () => {
    // In one process, so the transactions overlap for sure: 4 pools of 10 connections, every call
    // in flight together, each batch listing the same rows in a different order.
    const stores = await Promise.all(Array.from({ length: 4 }, () => fx.open()));
    const tenants = await Promise.all(['a', 'b', 'c'].map((n) => stores[0].createTenant(n)));
    const days = ['2024-10-30', '2024-10-31', '2024-11-01'];
    const calls = 50;
    await Promise.all(
      stores.flatMap((store, s) =>
        Array.from({ length: calls }, (_, i) => {
          const entries = tenants.flatMap((t) =>
            days.map((d) => usageOf(t.id, d, { requests: 1, promptTokens: s + 1, completionTokens: i })),
          );
          // A different order per call: the store sorts, so concurrent batches can't deadlock.
          const rotated = entries.map((_, k) => entries[(k + i * 7 + s) % entries.length]);
          return store.recordUsage(i % 2 ? rotated.reverse() : rotated);
        }),
      ),
    );
    const n = stores.length * calls;
    const promptTokens = calls * (1 + 2 + 3 + 4);
    const completionTokens = stores.length * ((calls * (calls - 1)) / 2);
    for (const t of tenants) {
      expect(await stores[1].getUsage(t.id, days[0], days[2])).toEqual(
        days.map((d) => ({ day: d, requests: n, promptTokens, completionTokens, trainingTokens: 0 })),
      );
    }
  });
});

describe('postgres: outage', () => {
  const fx = useStoreFixture(postgres);
  const extra: Store[] = [];
  let server: PostgresServer | undefined;
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

    server = await postgresServer();
    await server.stop();
    try {
      for (const call of [() => store.getTenant(t.id), () => store.createTenant('b'), () => store.claimJob('w', 1000, 3)]) {
        const started = Date.now();
        const e = await rejection(call());
        expect(e).toMatchObject({ code: 'database_unavailable', category: 'unavailable', status: 503 });
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
