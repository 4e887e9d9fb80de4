import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Rng } from '../src/rng.ts';
import type { ModelConfig } from '../src/model/config.ts';
import { median, round } from './machine.ts';
import { loreftArtifact, pairedLoads, startServer, streamBody, upload } from './server.ts';

/**
 * Issue 16's benchmark: 32 concurrent streams, each with its own composition of 2–3 stored
 * artifacts at different strengths (and some with their own layers or positions), against 32
 * plain streams, on the 135M-shape model over HTTP. Aggregate tokens/s of the steered load over
 * the plain one is the median of paired loads (the order alternating), as the server bench does.
 */
const STREAMS = 32;
const ARTIFACTS = 8;
/** Pairs of loads and tokens per stream: BENCH_STEER_PAIRS / BENCH_STEER_TOKENS shorten a run on a busy machine. */
const PAIRS = Number(process.env.BENCH_STEER_PAIRS ?? 7);
const MAX_NEW = Number(process.env.BENCH_STEER_TOKENS ?? 64);

export async function benchSteer(modelDir: string, config: ModelConfig, log: (s: string) => void) {
  const dataDir = mkdtempSync(join(tmpdir(), 'reft-bench-steer-'));
  const server = await startServer(modelDir, dataDir);
  try {
    const rng = new Rng(16);
    const last = config.numLayers - 1;
    // artifacts on different layers, as users' would be: 2 layers each, rank 4, f3+l3 or l5
    const artifacts: string[] = [];
    for (let i = 0; i < ARTIFACTS; i++) {
      const layers = [(3 * i) % (last + 1), (3 * i + 7) % (last + 1)].sort((a, b) => a - b);
      const files = loreftArtifact(900 + i, config, [...new Set(layers)], 4, i % 2 ? 'l5' : 'f3+l3');
      artifacts.push(await upload(server.url, files, `steer-${i}`));
    }
    // 32 different compositions: 2 or 3 distinct artifacts, strengths in [-2, 2]
    const compositions = Array.from({ length: STREAMS }, (_, s) => {
      const count = 2 + (s % 2);
      const picked = new Set<number>();
      while (picked.size < count) picked.add(Math.floor(rng.next() * ARTIFACTS));
      return [...picked].map((a, k) => ({
        intervention: artifacts[a],
        strength: round(-2 + 4 * rng.next(), 2),
        ...(k === 2 && s % 4 === 1 ? { positions: 'l2' } : {}),
      }));
    });
    const body = (interventions?: unknown) => streamBody(rng, MAX_NEW, interventions ? { interventions } : {});
    const paired = await pairedLoads(
      server.url,
      PAIRS,
      () => compositions.map(() => body()),
      () => compositions.map((c) => body(c)),
    );
    const loads = { a: paired.plain, b: paired.steered };
    const aggregate = paired.ratios('aggregate_tokens_s');
    const decode = paired.ratios('decode_tokens_s');
    const p = paired.middle(loads.a, 'aggregate_tokens_s');
    const v = paired.middle(loads.b, 'aggregate_tokens_s');
    log(
      `32 plain streams: ${p.aggregate_tokens_s} tokens/s; 32 streams each with its own composition of 2-3 of ${ARTIFACTS} artifacts: ${v.aggregate_tokens_s} tokens/s (ratio ${round(median(aggregate), 3)}, median of ${aggregate.length} pairs; decode-only ratio ${round(median(decode), 3)})`,
    );
    log(
      `32 composed streams: TTFT p50 ${v.ttft_ms.p50} ms p99 ${v.ttft_ms.p99} ms; inter-token p50 ${v.itl_ms.p50} ms p99 ${v.itl_ms.p99} ms (plain: TTFT p50 ${p.ttft_ms.p50} ms, inter-token p50 ${p.itl_ms.p50} ms)`,
    );
    return {
      streams32_plain: p,
      streams32_composed: v,
      composed_vs_plain: round(median(aggregate), 3),
      composed_vs_plain_pairs: aggregate.map((r) => round(r, 3)),
      composed_vs_plain_decode: round(median(decode), 3),
      all_runs: { plain: loads.a.map((r) => r.aggregate_tokens_s), composed: loads.b.map((r) => r.aggregate_tokens_s) },
      compositions,
    };
  } finally {
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}
