import { readFileSync } from 'node:fs';
import { Rng } from '../src/rng.ts';
import { median, round } from './machine.ts';

/**
 * Issue 5's soak: two servers and one training worker on one PostgreSQL, under concurrent
 * generation across many interventions plus training jobs, for a few minutes. It counts
 * failed requests, samples the servers' memory, and checks every job succeeded. Processes are
 * started by the caller (the test suite's helpers or the bench's), which passes their URLs
 * and pids.
 */
export interface SoakTarget {
  servers: Array<{ url: string; pid: number }>;
  key: string;
  /** Upload one intervention, returning its id. */
  upload(serverUrl: string, seed: number): Promise<string>;
}

export interface SoakOptions {
  seconds: number;
  clients: number;
  interventions: number;
  /** A training job is submitted this often. */
  jobEverySeconds: number;
  log?: (s: string) => void;
}

export interface SoakReport {
  seconds: number;
  requests: number;
  failed: number;
  failures: string[];
  tokens: number;
  tokens_per_second: number;
  jobs: { submitted: number; succeeded: number; other: Record<string, number> };
  rss_mb: Array<{ t: number; servers: number[] }>;
  /** Median RSS of each server over the last third of the run vs the middle third. */
  rss_growth_after_warmup_percent: number[];
}

function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]) / 1024;
}

export async function runSoak(target: SoakTarget, o: SoakOptions): Promise<SoakReport> {
  const log = o.log ?? (() => {});
  const auth = { authorization: `Bearer ${target.key}` };
  const adapters: string[] = [];
  for (let i = 0; i < o.interventions; i++) adapters.push(await target.upload(target.servers[i % target.servers.length].url, i));
  const rng = new Rng(11);
  const pick = <T>(xs: T[]) => xs[Math.floor(rng.next() * xs.length)];
  const prompts = ['Once upon a time', 'The little dog ran', 'One day, a girl named Sue', 'Tom had a big red ball', 'There was a tree'];
  const started = Date.now();
  const until = started + o.seconds * 1000;
  let requests = 0;
  let tokens = 0;
  const failures: string[] = [];
  const rss: SoakReport['rss_mb'] = [];
  const jobs: string[] = [];

  const client = async () => {
    while (Date.now() < until) {
      const server = pick(target.servers);
      const body: Record<string, unknown> = {
        prompt: pick(prompts),
        max_new_tokens: 8 + Math.floor(rng.next() * 40),
        temperature: rng.next() < 0.5 ? 0 : 0.8,
        seed: requests,
      };
      if (rng.next() < 0.85) body.adapter = pick(adapters);
      const stream = rng.next() < 0.3;
      requests++;
      try {
        const res = await fetch(`${server.url}/v1/generate`, {
          method: 'POST',
          headers: { ...auth, 'content-type': 'application/json' },
          body: JSON.stringify({ ...body, stream }),
        });
        const text = await res.text();
        if (!res.ok) throw new Error(`HTTP ${res.status}: ${text.slice(0, 200)}`);
        if (stream) {
          if (!text.includes('"type":"done"')) throw new Error(`stream ended without done: ${text.slice(-200)}`);
          tokens += text.split('"type":"token"').length - 1;
        } else {
          tokens += (JSON.parse(text) as { token_ids: number[] }).token_ids.length;
        }
      } catch (e) {
        failures.push(`${server.url} ${(e as Error).message}`);
      }
    }
  };

  const trainer = async () => {
    let i = 0;
    while (Date.now() < until - 5_000) {
      const server = target.servers[i % target.servers.length];
      const res = await fetch(`${server.url}/v1/training/jobs`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({
          data: prompts.map((p) => ({ prompt: p, completion: ' And then they all had cake.' })),
          intervention: { rank: 1 + (i % 2), layers: [1, 3] },
          hyperparameters: { epochs: 4, seed: i },
          name: `soak-job-${i}`,
        }),
      });
      requests++;
      if (res.status !== 202) failures.push(`job submit HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`);
      else jobs.push(((await res.json()) as { id: string }).id);
      i++;
      await new Promise((r) => setTimeout(r, o.jobEverySeconds * 1000));
    }
  };

  const sampler = async () => {
    while (Date.now() < until) {
      rss.push({ t: Math.round((Date.now() - started) / 1000), servers: target.servers.map((s) => round(rssMb(s.pid), 1)) });
      log(`soak t=${rss.at(-1)!.t}s requests=${requests} failed=${failures.length} rss=${rss.at(-1)!.servers.join('/')} MB`);
      await new Promise((r) => setTimeout(r, 5_000));
    }
  };

  await Promise.all([...Array.from({ length: o.clients }, client), trainer(), sampler()]);
  const seconds = (Date.now() - started) / 1000;

  // every job must finish, successfully
  const statuses: Record<string, number> = {};
  for (const id of jobs) {
    let status = 'queued';
    for (let i = 0; i < 600 && !['succeeded', 'failed', 'cancelled'].includes(status); i++) {
      const res = await fetch(`${target.servers[0].url}/v1/training/jobs/${id}`, { headers: auth });
      status = ((await res.json()) as { status: string }).status;
      if (!['succeeded', 'failed', 'cancelled'].includes(status)) await new Promise((r) => setTimeout(r, 200));
    }
    statuses[status] = (statuses[status] ?? 0) + 1;
  }
  const third = Math.floor(rss.length / 3);
  const growth = target.servers.map((_, s) => {
    const mid = median(rss.slice(third, 2 * third).map((r) => r.servers[s]));
    const last = median(rss.slice(2 * third).map((r) => r.servers[s]));
    return round(((last - mid) / mid) * 100, 1);
  });
  const { succeeded = 0, ...other } = statuses;
  return {
    seconds: round(seconds, 1),
    requests,
    failed: failures.length,
    failures: failures.slice(0, 20),
    tokens,
    tokens_per_second: round(tokens / seconds, 1),
    jobs: { submitted: jobs.length, succeeded, other },
    rss_mb: rss,
    rss_growth_after_warmup_percent: growth,
  };
}
