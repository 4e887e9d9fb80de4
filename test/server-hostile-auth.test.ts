import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDatabase, dropDatabase } from './support/databases.ts';
import { STORIES } from './support/fixtures.ts';
import { json, type Api } from './support/http.ts';
import { BIN, startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * Issue 11, findings 10 and 11 (keys and internals): no addresses or engine messages in answers,
 * a weak admin key refused at start, failed keys throttled per address, /metrics behind a key.
 */
const ADMIN = 'hostile-admin-key-0123456789abcdef0123456789';
const METRICS = 'metrics-key-for-tests';

/** A TCP forwarder to PostgreSQL that the test can cut, as an outage the other tests don't feel. */
class Outage {
  private readonly sockets = new Set<Socket>();
  private server!: Server;
  port = 0;

  async start(target: { host: string; port: number }): Promise<void> {
    this.server = createServer((client) => {
      const upstream = connect(target.port, target.host);
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => {});
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as { port: number }).port;
  }

  /** Connections drop and new ones are refused (the port closes). */
  async cut(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

let server: ServerProcess;
let api: Api;
let database: string;
const outage = new Outage();

beforeAll(async () => {
  database = await createDatabase();
  const url = new URL(database);
  await outage.start({ host: url.hostname, port: Number(url.port || 5432) });
  url.port = String(outage.port);
  server = await startServerProcess({
    database: url.toString(),
    env: { REFT_ADMIN_KEY: ADMIN, REFT_METRICS_KEY: METRICS },
    args: ['--no-worker'],
  });
  api = { url: server.url, key: ADMIN };
});
afterAll(async () => {
  await server.stop();
  await dropDatabase(database);
});

describe('keys', () => {
  it('an admin key shorter than 32 characters is refused at start', () => {
    const r = spawnSync(
      process.execPath,
      [BIN, 'serve', '--model', STORIES, '--port', '0', '--data-dir', mkdtempSync(join(tmpdir(), 'reft-weak-'))],
      {
        encoding: 'utf8',
        env: { ...process.env, REFT_ADMIN_KEY: 'short-admin-key' },
        timeout: 30_000,
      },
    );
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/REFT_ADMIN_KEY has 15 characters; use at least 32/);
  });

  it('/metrics needs REFT_METRICS_KEY when it is set', async () => {
    expect((await json({ url: server.url }, 'GET', '/metrics')).status).toBe(401);
    expect((await json({ url: server.url, key: 'wrong' }, 'GET', '/metrics')).status).toBe(401);
    const ok = await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${METRICS}` } });
    expect(ok.status).toBe(200);
    expect(await ok.text()).toMatch(/^# HELP/m);
  });
});

describe('finding 10: answers carry no internals', () => {
  it('with the database down, answers name no address and carry a request id', async () => {
    await outage.cut();
    const res = await fetch(`${server.url}/v1/interventions`, {
      headers: { authorization: `Bearer rft_${'x'.repeat(40)}`, 'x-request-id': 'outage-probe-1' },
    });
    const body = (await res.json()) as { status: number; detail: string };
    expect(res.status).toBeGreaterThanOrEqual(500);
    expect(body.detail).toContain('outage-probe-1');
    expect(JSON.stringify(body)).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|:\d{4,5}\b|5432/);
    const admin = await json(api, 'GET', '/v1/admin/tenants');
    expect(admin.status).toBeGreaterThanOrEqual(500);
    expect(JSON.stringify(admin.body)).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|5432/);
    // the log keeps the cause for the operator, under the same request id
    await new Promise((r) => setTimeout(r, 100));
    expect(
      server.logs.some((l) => l.reqId === 'outage-probe-1' && JSON.stringify(l).match(/ECONNREFUSED|connect|terminat|Connection/i)),
    ).toBe(true);
  });
});

describe('failed keys', () => {
  it('failed keys from one address are refused with 429 after 10 a minute, before any lookup', async () => {
    const statuses: number[] = [];
    // the admin route compares keys without the store, so this runs with the database cut
    for (let i = 0; i < 10; i++) statuses.push((await json({ url: server.url, key: `guess-${i}` }, 'GET', '/v1/admin/tenants')).status);
    expect(statuses).toEqual(new Array(10).fill(403));
    const blocked = await json({ url: server.url, key: 'guess-more' }, 'GET', '/v1/admin/tenants');
    expect(blocked.status).toBe(429);
    expect(Number(blocked.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(blocked.body).toMatchObject({ code: 'failed_keys_rate_limited', field: 'authorization' });
  });
});
