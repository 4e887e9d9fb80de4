import { runSoak, type SoakOptions, type SoakReport } from '../../bench/soak.ts';
import { artifact, randomLoreft } from './artifacts.ts';
import { createDatabase, dropDatabase } from './databases.ts';
import { json, upload } from './http.ts';
import { startServerProcess, startWorkerProcess } from './server.ts';

/** Two servers and one worker on a fresh PostgreSQL database, soaked with `runSoak`. */
export async function soakCluster(options: SoakOptions): Promise<SoakReport> {
  const admin = 'soak-admin-key-0123456789abcdef012345';
  const database = await createDatabase();
  const servers = await Promise.all(
    [0, 1].map(() =>
      startServerProcess({ database, env: { REFT_ADMIN_KEY: admin }, args: ['--no-worker', '--tenant-max-concurrent', '64'] }),
    ),
  );
  const worker = await startWorkerProcess(database, ['--lease-ms', '5000', '--poll-ms', '200']);
  try {
    const tenant = await json({ url: servers[0].url, key: admin }, 'POST', '/v1/admin/tenants', { name: 'soak' });
    const key = (await json({ url: servers[1].url, key: admin }, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body
      .key as string;
    return await runSoak(
      {
        servers: servers.map((s) => ({ url: s.url, pid: s.proc.pid! })),
        key,
        upload: async (url, seed) => {
          const res = await upload(
            { url, key },
            artifact([randomLoreft(seed, seed % 5, 1 + (seed % 4), seed % 2 ? 'f2+l2' : 'l3')], { name: `soak-${seed}` }),
          );
          if (res.status !== 201) throw new Error(JSON.stringify(res.body));
          return res.body.id;
        },
      },
      options,
    );
  } finally {
    await Promise.all([...servers.map((s) => s.stop()), worker.stop()]);
    await dropDatabase(database);
  }
}
