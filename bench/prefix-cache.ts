import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ModelConfig } from '../src/model/config.ts';
import { Rng } from '../src/rng.ts';
import { treeRss } from './against-revision.ts';
import { inPairs, median, pairRatios, round } from './machine.ts';
import { load, loreftArtifact, startServer, upload } from './server.ts';

/**
 * Issue 25's benchmark, through a server process on the 135M-shape model: the time to first
 * token of a 1,040-token prompt whose first 1,024 tokens were just sent, against the same prompt
 * cold; 32 streams sharing a 512-token system prompt, 8 different `l`-only interventions among
 * them, with the cache and without it (paired loads, the order alternating); and a soak of
 * random prompts that must keep the server's memory flat within the cache's budget.
 */
const PAIRS = Number(process.env.BENCH_PREFIX_PAIRS ?? 5);
const SOAK_REQUESTS = Number(process.env.BENCH_PREFIX_SOAK ?? 300);
const SOAK_BUDGET = 64 * 2 ** 20;

const tokens = (rng: Rng, n: number) => Array.from({ length: n }, () => 1 + Math.floor(rng.next() * 500));

export async function benchPrefixCache(modelDir: string, config: ModelConfig, log: (s: string) => void) {
  const dataDir = mkdtempSync(join(tmpdir(), 'reft-bench-prefix-'));
  const server = await startServer(modelDir, dataDir, { args: ['--prefix-cache-bytes', String(SOAK_BUDGET)] });
  try {
    const rng = new Rng(25);
    const ttft = async (body: object) => (await load(server.url, [{ max_new_tokens: 1, ignore_eos: true, ...body }])).ttft_ms.p50;
    await ttft({ input_ids: tokens(rng, 64) }); // warm-up

    // 1. a 1,040-token prompt after its first 1,024 tokens were sent (a salt per pair: cold each time)
    const first = await inPairs(
      PAIRS,
      async () => ttft({ input_ids: [...tokens(new Rng(1), 1024), ...tokens(rng, 16)], cache_salt: `cold-${rng.next()}` }),
      async () => {
        const salt = `warm-${rng.next()}`;
        const prefix = tokens(new Rng(2), 1024);
        await ttft({ input_ids: [...prefix, ...tokens(rng, 16)], cache_salt: salt });
        return ttft({ input_ids: [...prefix, ...tokens(rng, 16)], cache_salt: salt });
      },
    );
    const ratio = median(pairRatios(first));
    log(
      `prefix cache: a 1,040-token prompt whose first 1,024 tokens are cached reaches its first token in ${round(median(first.b), 1)} ms against ${round(median(first.a), 1)} ms cold: ${round(ratio * 100, 1)}% (median of ${first.a.length} pairs)`,
    );

    // 2. 32 streams sharing a 512-token system prompt, 8 different l-only interventions among them
    const adapters: string[] = [];
    for (let i = 0; i < 8; i++) {
      const layers = [(4 * i) % config.numLayers, (4 * i + 9) % config.numLayers];
      adapters.push(await upload(server.url, loreftArtifact(250 + i, config, [...new Set(layers)], 4, 'l3'), `prefix-${i}`));
    }
    const system = tokens(new Rng(3), 512);
    const streams = (cache: boolean) =>
      Array.from({ length: 32 }, (_, s) => ({
        input_ids: [...system, ...tokens(rng, 16)],
        max_new_tokens: 64,
        ignore_eos: true,
        ...(s % 4 ? { adapter: adapters[s % 8] } : {}),
        ...(cache ? {} : { cache_prompt: false }),
      }));
    await load(server.url, streams(true)); // the system prompt's blocks cached
    const loads = await inPairs(
      Math.max(3, PAIRS - 2),
      () => load(server.url, streams(false)),
      () => load(server.url, streams(true)),
    );
    const aggregate = median(pairRatios({ a: loads.a.map((l) => l.aggregate_tokens_s), b: loads.b.map((l) => l.aggregate_tokens_s) }));
    const mid = (runs: typeof loads.a) => [...runs].sort((x, y) => x.aggregate_tokens_s - y.aggregate_tokens_s)[runs.length >> 1];
    const [off, on] = [mid(loads.a), mid(loads.b)];
    log(
      `prefix cache: 32 streams sharing a 512-token system prompt (8 l3 interventions among them): ${on.aggregate_tokens_s} tokens/s with the cache, ${off.aggregate_tokens_s} without (ratio ${round(aggregate, 2)}, median of ${loads.a.length} pairs); TTFT p50 ${on.ttft_ms.p50} vs ${off.ttft_ms.p50} ms`,
    );

    // 3. a soak of random prompts: memory stays flat within the cache's budget
    const rss: number[] = [];
    const cacheBytes: number[] = [];
    for (let i = 0; i < SOAK_REQUESTS; i++) {
      await load(server.url, [{ input_ids: tokens(rng, 200 + Math.floor(rng.next() * 300)), max_new_tokens: 2, ignore_eos: true }]);
      if (i % 10 === 9) {
        rss.push(treeRss(server.pid));
        const metrics = await (await fetch(`${server.url}/metrics`)).text();
        cacheBytes.push(Number(/^reft_prefix_cache_bytes (\d+)/m.exec(metrics)![1]));
      }
      await sleep(0);
    }
    const third = Math.floor(rss.length / 3);
    const growth = (median(rss.slice(2 * third)) - median(rss.slice(third, 2 * third))) / median(rss.slice(third, 2 * third));
    log(
      `prefix cache soak: ${SOAK_REQUESTS} random prompts of 200-500 tokens; cache ${round(Math.max(...cacheBytes) / 2 ** 20, 1)} MiB at most (budget ${SOAK_BUDGET / 2 ** 20} MiB); server RSS ${round(rss[0] / 2 ** 20, 0)} → ${round(rss.at(-1)! / 2 ** 20, 0)} MB, last third vs middle third ${round(growth * 100, 1)}%`,
    );
    return {
      ttft_cached_1024_of_1040_ms: round(median(first.b), 1),
      ttft_cold_1040_ms: round(median(first.a), 1),
      ttft_cached_over_cold: round(ratio, 3),
      ttft_pairs: pairRatios(first).map((r) => round(r, 3)),
      streams32_shared_system_prompt: { with_cache: on, without_cache: off, aggregate_ratio: round(aggregate, 3) },
      soak: {
        requests: SOAK_REQUESTS,
        budget_bytes: SOAK_BUDGET,
        max_cache_bytes: Math.max(...cacheBytes),
        rss_mb: rss.map((r) => round(r / 2 ** 20, 0)),
        rss_growth_last_vs_middle_third_percent: round(growth * 100, 1),
      },
    };
  } finally {
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}
