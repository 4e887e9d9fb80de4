/**
 * Another process using the same store as a test (a second server or a training worker stand-in).
 *
 *   node --import tsx test/support/store-child.ts <sqlite|postgres> <location> <mode> [args...]
 *
 * <location> is a data directory (sqlite) or a database URL (postgres). Modes:
 *   noop                          exit at once (for a pid that no longer runs)
 *   open                          open (migrating a fresh location), create a tenant, print {tenant}
 *   claim <workerId>              print "ready", wait for "go" on stdin, claim and fail jobs until
 *                                 none is left, print {claimed}
 *   crash <point> <replaceId> <tenantId>
 *                                 (sqlite) put an intervention, killing itself at a fault point
 *   change <tenantId> <replaceId> <deleteId>
 *                                 replace one intervention, delete another, queue a job (printing
 *                                 "changed" when done), then report what its own listeners saw
 */
import { createInterface } from 'node:readline';
import { openPostgresStore } from '../../src/storage/postgres-store.ts';
import { openSqliteStore } from '../../src/storage/sqlite-store.ts';
import type { FaultPoint } from '../../src/storage/sqlite-store.ts';
import type { Store } from '../../src/storage/store.ts';

const [backend, location, mode, ...args] = process.argv.slice(2);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const print = (value: unknown) => console.log(typeof value === 'string' ? value : JSON.stringify(value));

function open(faultHook?: (point: FaultPoint) => void): Promise<Store> {
  if (backend === 'sqlite') return openSqliteStore(location, { faultHook });
  if (backend === 'postgres') return openPostgresStore(location);
  throw new Error(`unknown backend "${backend}"`);
}

/** Resolves when the parent writes `line` to our stdin. */
function waitForLine(line: string): Promise<void> {
  return new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin });
    rl.on('line', (l) => {
      if (l.trim() === line) {
        rl.close();
        process.stdin.destroy(); // an open stdin pipe would keep this process alive
        resolve();
      }
    });
  });
}

if (mode === 'noop') {
  // nothing
} else if (mode === 'open') {
  const store = await open();
  const t = await store.createTenant(`from-${process.pid}`);
  print({ tenant: t.id });
  await store.close();
} else if (mode === 'claim') {
  const [workerId] = args;
  const store = await open();
  print('ready');
  await waitForLine('go');
  const claimed: string[] = [];
  for (;;) {
    const got = await store.claimJob(workerId, 60_000, 3);
    if (!got) break;
    claimed.push(got.job.id);
    await sleep(5);
    if (!(await store.finishJob(got.job.id, workerId, { status: 'failed', error: `done by ${workerId}` }))) throw new Error('lost lease');
  }
  print({ claimed });
  await store.close();
} else if (mode === 'crash') {
  const [point, replaceId, tenantId] = args;
  const store = await open((at) => {
    if (at === point) process.kill(process.pid, 'SIGKILL');
  });
  await store.putIntervention(
    {
      tenantId,
      name: 'crashy',
      source: 'upload',
      config: {},
      files: { config: new Uint8Array([1, 2, 3]), weights: new Uint8Array(1000) },
    },
    replaceId || undefined,
  );
  print('survived');
} else if (mode === 'change') {
  const [tenantId, replaceId, deleteId] = args;
  const store = await open();
  const seen: string[] = [];
  let woken = 0;
  store.onInterventionChanged((id) => seen.push(id));
  store.onJobQueued(() => woken++);
  await store.putIntervention(
    {
      tenantId,
      name: 'replaced-by-child',
      source: 'upload',
      config: {},
      files: { config: new Uint8Array([1]), weights: new Uint8Array(8) },
    },
    replaceId,
  );
  await store.deleteIntervention(tenantId, deleteId);
  await store.createJob(tenantId, { from: 'child' });
  print('changed');
  // Long enough for the echo of our own NOTIFYs to arrive: they must not fire our listeners again.
  await sleep(500);
  print({ seen, woken });
  await store.close();
} else {
  throw new Error(`unknown mode "${mode}"`);
}
