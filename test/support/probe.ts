import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { expect } from 'vitest';
import { json, type Api } from './http.ts';

/** Resident memory of a process (MB), from /proc. */
export function rssMb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) / 1024;
}

/**
 * Polls /healthz back to back from a separate process (so the test's own uploads don't delay
 * the measurement), printing each answer's latency in ms, until its stdin closes.
 */
const PROBER = `
const url = process.argv[1];
let done = false;
process.stdin.on('end', () => (done = true)).resume();
(async () => {
  while (!done) {
    const t = performance.now();
    try { const r = await fetch(url); await r.text(); process.stdout.write((performance.now() - t).toFixed(1) + '\\n'); }
    catch { process.stdout.write('-1\\n'); }
    await new Promise((r) => setTimeout(r, 10));
  }
})();
`;

/**
 * Runs `work` while another process polls /healthz; returns its result with the slowest
 * /healthz answer seen (ms), the slowest seen in the second before `work` began (the machine's
 * own noise: tests share a loaded machine), and the most the server's RSS grew (MB) meanwhile.
 */
export async function whileProbing<T>(
  api: Api,
  pid: number,
  work: () => Promise<T>,
): Promise<{ result: T; slowestHealthzMs: number; idleSlowestHealthzMs: number; rssGrowthMb: number; probes: number }> {
  const rss0 = rssMb(pid);
  let peak = rss0;
  const prober = spawn(process.execPath, ['-e', PROBER, `${api.url}/healthz`], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  prober.stdout!.on('data', (d) => (out += d));
  const exited = new Promise((r) => prober.once('exit', r));
  // the prober's first answers include its own start-up (connection, JIT): measure after them
  while (out.split('\n').length < 4) await new Promise((r) => setTimeout(r, 10));
  const idleFrom = out.length;
  await new Promise((r) => setTimeout(r, 1000));
  const idle = out.slice(idleFrom).trim().split('\n').map(Number);
  const skip = out.length;
  const sampler = setInterval(() => (peak = Math.max(peak, rssMb(pid))), 5);
  try {
    const result = await work();
    await new Promise((r) => setTimeout(r, 50)); // a probe or two after the answer
    peak = Math.max(peak, rssMb(pid));
    const latencies = out.slice(skip).trim().split('\n').map(Number);
    if (latencies.includes(-1)) throw new Error('/healthz failed while probing');
    return {
      result,
      slowestHealthzMs: Math.max(...latencies),
      idleSlowestHealthzMs: Math.max(...idle),
      rssGrowthMb: peak - rss0,
      probes: latencies.length,
    };
  } finally {
    clearInterval(sampler);
    prober.stdin!.end();
    await exited;
  }
}

/**
 * /healthz answered within 100 ms while the work ran, beyond what the machine's own noise cost
 * it just before (on a quiet machine that noise is a few ms).
 */
export function expectHealthzResponsive(p: {
  slowestHealthzMs: number;
  idleSlowestHealthzMs: number;
  rssGrowthMb?: number;
  probes?: number;
}): void {
  if (process.env.REFT_TEST_PROBE_LOG)
    console.log(
      `probe: slowest /healthz ${p.slowestHealthzMs} ms (idle ${p.idleSlowestHealthzMs} ms, ${p.probes} probes), RSS growth ${p.rssGrowthMb?.toFixed(1)} MB`,
    );
  expect(p.slowestHealthzMs, `idle slowest ${p.idleSlowestHealthzMs} ms`).toBeLessThan(100 + p.idleSlowestHealthzMs);
}

/** The server still generates: a short greedy completion comes back. */
export async function stillGenerates(api: Api): Promise<void> {
  const res = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 4, ignore_eos: true });
  expect(res.status, JSON.stringify(res.body)).toBe(200);
  expect(res.body.token_ids ?? res.body.tokens ?? res.body.text).toBeTruthy();
}

/** A problem+json answer with this status carrying the catalogue entry `code`. */
export function expectProblem(res: { status: number; body: any; headers: Headers }, status: number, code: string, field?: string): void {
  expect(res.status, JSON.stringify(res.body)).toBe(status);
  expect(res.headers.get('content-type')).toContain('application/problem+json');
  expect(res.body).toMatchObject({ code, type: `/problems/${code}` });
  if (field !== undefined) expect(res.body.field).toBe(field);
}
