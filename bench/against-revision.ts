import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { argmax } from '../src/sampling/sampler.ts';
import type { ModelConfig } from '../src/model/config.ts';
import { Rng } from '../src/rng.ts';
import { inPairs, median, pairRatios, round } from './machine.ts';
import { revisionRunner, revisionTree, type DecodeRunner } from './revision.ts';
import { load, startServer } from './server.ts';

/**
 * Today's engine against a revision's (`npm run bench -- engine --baseline <rev>`), in the same
 * run: decode at batch 1 and 8 as paired, interleaved bursts (the median of each pair's ratio,
 * today / baseline), and issue 23's mixed load through a server process (24 greedy streams of
 * 200 tokens, one with a 3,000-token prompt, 23 with 16-token prompts): its throughput and the
 * server's peak memory over idle, for the baseline and for today's with and without a KV budget.
 */
const BURST_STEPS = 8;

async function burst(runner: DecodeRunner, rows: number, vocab: number, seed: number): Promise<number> {
  const rng = new Rng(seed);
  const inputs = Array.from({ length: rows }, () => ({
    tokens: Array.from({ length: 16 }, () => 1 + Math.floor(rng.next() * (vocab - 1))),
  }));
  const outs = await runner.prefill(inputs);
  let tokens = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  tokens = new Map([...(await runner.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const t = performance.now();
  for (let i = 0; i < BURST_STEPS; i++) tokens = new Map([...(await runner.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) runner.release(o.id);
  await sleep(40); // ORT's pool threads spin after a run: let them sleep before the other engine's burst
  return (BURST_STEPS * rows) / seconds;
}

/** RSS of a process and its descendants, bytes (Linux /proc). */
export function treeRss(pid: number): number {
  const children = (() => {
    try {
      return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    } catch {
      return [];
    }
  })();
  let rss = 0;
  try {
    rss = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;
  } catch {
    /* gone */
  }
  return rss + children.reduce((s, c) => s + treeRss(c), 0);
}

async function mixedLoad(modelDir: string, opts: { tree?: string; args?: string[] }) {
  const dataDir = mkdtempSync(join(tmpdir(), 'reft-bench-mixed-'));
  const server = await startServer(modelDir, dataDir, opts);
  try {
    const rng = new Rng(23);
    const prompt = (n: number) => Array.from({ length: n }, () => 1 + Math.floor(rng.next() * 500));
    await load(server.url, [{ input_ids: prompt(16), max_new_tokens: 8, ignore_eos: true }]); // weights paged in
    await sleep(500);
    const idle = treeRss(server.pid);
    let peak = idle;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        peak = Math.max(peak, treeRss(server.pid));
        await sleep(50);
      }
    })();
    const bodies = [prompt(3000), ...Array.from({ length: 23 }, () => prompt(16))].map((input_ids) => ({
      input_ids,
      max_new_tokens: 200,
      ignore_eos: true,
    }));
    const result = await load(server.url, bodies);
    sampling = false;
    await sampler;
    return { ...result, idle_rss_mb: round(idle / 2 ** 20, 0), peak_over_idle_mb: round((peak - idle) / 2 ** 20, 0) };
  } finally {
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

export async function benchAgainstRevision(
  modelDir: string,
  config: ModelConfig,
  today: () => Promise<DecodeRunner>,
  rev: string,
  workDir: string,
  log: (s: string) => void,
) {
  const { dir, sha } = revisionTree(rev);
  const cacheDir = join(workDir, `cache-rev-${sha.slice(0, 12)}`);
  // Two halves with the sessions created in opposite orders: the session created second in a
  // process measured 4-9% faster than an identical one created before it, on this VM, so each
  // half's paired ratios cluster on one side and a pooled median lands on whichever cluster has
  // a sample more. Each half gives its median; the halves are combined by their geometric mean,
  // in which the order's effect cancels.
  type Half = { a: number[]; b: number[] };
  const halves: Record<1 | 8, Half[]> = { 1: [], 8: [] };
  for (const todayFirst of [true, false]) {
    const first = todayFirst ? await today() : await revisionRunner(dir, modelDir, cacheDir);
    const second = todayFirst ? await revisionRunner(dir, modelDir, cacheDir) : await today();
    const [mine, theirs] = todayFirst ? [first, second] : [second, first];
    for (const rows of [1, 8] as const) {
      await burst(mine, rows, config.vocabSize, 0);
      await burst(theirs, rows, config.vocabSize, 0);
      halves[rows].push(
        await inPairs(
          rows === 1 ? 16 : 20,
          () => burst(theirs, rows, config.vocabSize, 1),
          () => burst(mine, rows, config.vocabSize, 1),
        ),
      );
    }
    await Promise.all([first.close(), second.close()]);
  }
  const decode: Record<string, unknown> = {};
  for (const rows of [1, 8] as const) {
    const [todayFirst, baseFirst] = halves[rows].map((h) => median(pairRatios(h)));
    const ratio = Math.sqrt(todayFirst * baseFirst);
    const all = (k: 'a' | 'b') => halves[rows].flatMap((h) => h[k]);
    decode[`batch${rows}`] = {
      baseline_tokens_s: round(median(all('a')), 1),
      today_tokens_s: round(median(all('b')), 1),
      ratio: round(ratio, 3),
      ratio_today_created_first: round(todayFirst, 3),
      ratio_baseline_created_first: round(baseFirst, 3),
      pairs: halves[rows].map((h) => pairRatios(h).map((r) => round(r, 3))),
    };
    log(
      `decode batch ${rows}, today vs ${sha.slice(0, 8)}: ${round(median(all('b')), 1)} vs ${round(median(all('a')), 1)} tokens/s, ratio ${round(ratio, 3)} (geometric mean of ${round(todayFirst, 3)} with today's session created first and ${round(baseFirst, 3)} with the baseline's, each the median of ${halves[rows][0].a.length} interleaved pairs)`,
    );
  }

  const mixed: Record<string, unknown> = {};
  const loads: Array<[string, { tree?: string; args?: string[] }]> = [
    [`baseline ${sha.slice(0, 8)}`, { tree: dir }],
    ['today, default budget', {}],
    ['today, --kv-budget 1GiB', { args: ['--kv-budget', '1GiB'] }],
  ];
  for (const [name, opts] of loads) {
    const r = await mixedLoad(modelDir, opts);
    mixed[name] = r;
    log(
      `mixed load (${name}): ${r.aggregate_tokens_s} tokens/s over ${r.wall_seconds} s, TTFT p50 ${r.ttft_ms.p50} ms p99 ${r.ttft_ms.p99} ms; server memory idle ${r.idle_rss_mb} MB, peak +${r.peak_over_idle_mb} MB`,
    );
  }
  return { baseline: sha, decode, mixed_load: mixed };
}
