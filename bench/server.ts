import { setTimeout as sleep } from 'node:timers/promises';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Rng } from '../src/rng.ts';
import { artifact, randomLoreft } from '../test/support/artifacts.ts';
import { InterventionCache } from '../src/interventions/cache.ts';
import type { ModelConfig } from '../src/model/config.ts';
import { openSqliteStore } from '../src/storage/sqlite-store.ts';
import { inPairs, median, pairRatios, percentile, round } from './machine.ts';

/**
 * Issue 3's benchmark: a real server process on the 135M-shape model driven over HTTP as
 * clients would: 32 concurrent streams over 32 distinct interventions, the same load without
 * interventions, one stream alone; time to first token and inter-token latency; and the cost
 * of first use of an intervention that isn't cached yet.
 */
const BIN = join(import.meta.dirname, '..', 'bin', 'reft-server.js');

/** A LoReFT artifact with one rank-`rank` intervention on each of `layers`. */
export function loreftArtifact(seed: number, config: ModelConfig, layers: number[], rank: number, positions: string) {
  const base = { hidden_size: config.hiddenSize, num_hidden_layers: config.numLayers };
  return artifact(
    layers.map((layer, i) => randomLoreft(seed * 1000 + i, layer, rank, positions, config.hiddenSize, 0.05)),
    {},
    base,
  );
}

interface StreamTiming {
  tokens: number;
  start: number;
  firstToken: number;
  end: number;
  gaps: number[];
}

async function stream(url: string, body: unknown): Promise<StreamTiming> {
  const start = performance.now();
  const res = await fetch(`${url}/v1/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...(body as object), stream: true }),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let tokens = 0;
  let firstToken = 0;
  let last = 0;
  const gaps: number[] = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf('\n\n')) >= 0) {
      const frame = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      if (!frame.includes('"type":"token"')) continue;
      const now = performance.now();
      tokens++;
      if (!firstToken) firstToken = now;
      else gaps.push(now - last);
      last = now;
    }
  }
  return { tokens, start, firstToken, end: performance.now(), gaps };
}

export async function load(url: string, bodies: unknown[]) {
  const t = performance.now();
  const runs = await Promise.all(bodies.map((b) => stream(url, b)));
  const seconds = (performance.now() - t) / 1000;
  const tokens = runs.reduce((s, r) => s + r.tokens, 0);
  const ttft = runs.map((r) => r.firstToken - r.start);
  const itl = runs.flatMap((r) => r.gaps);
  // decode throughput: tokens after the first of each stream over the span from the first first-token to the end
  const decodeTokens = tokens - runs.length;
  const decodeSpan = (Math.max(...runs.map((r) => r.end)) - Math.min(...runs.map((r) => r.firstToken))) / 1000;
  return {
    streams: runs.length,
    tokens,
    wall_seconds: round(seconds, 2),
    aggregate_tokens_s: round(tokens / seconds, 1),
    decode_tokens_s: round(decodeTokens / decodeSpan, 1),
    ttft_ms: { p50: round(percentile(ttft, 50), 1), p99: round(percentile(ttft, 99), 1) },
    itl_ms: { p50: round(percentile(itl, 50), 1), p99: round(percentile(itl, 99), 1) },
  };
}

/** 16 random token ids, as a client's prompt. */
export const randomPrompt = (rng: Rng) => Array.from({ length: 16 }, () => 1 + Math.floor(rng.next() * 500));

/** A streamed request of `maxNew` tokens over a random prompt, with `extra` fields (an adapter, interventions). */
export const streamBody = (rng: Rng, maxNew: number, extra: Record<string, unknown> = {}) => ({
  input_ids: randomPrompt(rng),
  max_new_tokens: maxNew,
  ignore_eos: true,
  ...extra,
});

type Load = Awaited<ReturnType<typeof load>>;
type LoadMetric = 'aggregate_tokens_s' | 'decode_tokens_s';

/**
 * A load of `plain()`'s request bodies and one of `steered()`'s, back to back `pairs` times with
 * the order alternating, after a warm-up (one plain request, then every steered body once, so
 * each intervention is cached). A metric's ratio is the median of the pairs' ratios, since the
 * machine's speed drifts between pairs more than the effect.
 */
export async function pairedLoads(url: string, pairs: number, plain: () => unknown[], steered: () => unknown[]) {
  await load(url, plain().slice(0, 1));
  await load(url, steered());
  const loads = await inPairs(
    pairs,
    () => load(url, plain()),
    () => load(url, steered()),
  );
  return {
    plain: loads.a,
    steered: loads.b,
    ratios: (metric: LoadMetric) => pairRatios({ a: loads.a.map((x) => x[metric]), b: loads.b.map((x) => x[metric]) }),
    /** The run with the median `metric` of `runs`. */
    middle: (runs: Load[], metric: LoadMetric) => [...runs].sort((x, y) => x[metric] - y[metric])[runs.length >> 1],
  };
}

export interface BenchServer {
  url: string;
  pid: number;
  stop: () => Promise<void>;
}

/** A server process on `modelDir`; `tree` runs another checkout's server (a baseline revision), `args` adds flags. */
export async function startServer(modelDir: string, dataDir: string, opts: { tree?: string; args?: string[] } = {}): Promise<BenchServer> {
  const proc = spawn(
    process.execPath,
    [
      opts.tree ? join(opts.tree, 'bin', 'reft-server.js') : BIN,
      'serve',
      '--model',
      modelDir,
      '--port',
      '0',
      '--data-dir',
      dataDir,
      '--no-worker',
      '--tenant-max-concurrent',
      '128',
      '--max-batch-size',
      '32',
      '--log-level',
      'info',
      ...(opts.args ?? []),
    ],
    {
      env: { ...process.env, REFT_LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  const url = await new Promise<string>((resolve, reject) => {
    let listening = '';
    createInterface({ input: proc.stdout! }).on('line', (line) => {
      try {
        const e = JSON.parse(line);
        if (e.msg === 'listening') listening = e.url;
        if (e.msg === 'model ready') resolve(listening);
      } catch {
        /* not a log line */
      }
    });
    proc.once('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  return {
    url,
    pid: proc.pid!,
    stop: () =>
      new Promise<void>((resolve) => {
        proc.once('exit', () => resolve());
        proc.kill('SIGTERM');
      }),
  };
}

export async function upload(url: string, files: { config: string; weights: Uint8Array }, name: string): Promise<string> {
  const form = new FormData();
  form.append('config', new Blob([files.config]), 'reft_config.json');
  form.append('weights', new Blob([files.weights]), 'reft_weights.safetensors');
  form.append('name', name);
  const res = await fetch(`${url}/v1/interventions`, { method: 'POST', body: form });
  const body = (await res.json()) as { id: string };
  if (res.status !== 201) throw new Error(JSON.stringify(body));
  return body.id;
}

/** In-process cost of resolving an intervention: store read, parse, validation, shared buffers. */
async function firstUseInProcess(config: ModelConfig): Promise<{ miss_ms: number; hit_ms: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'reft-bench-store-'));
  const store = await openSqliteStore(dir);
  const tenant = await store.createTenant('bench');
  const all = Array.from({ length: config.numLayers }, (_, l) => l);
  const ids: string[] = [];
  const warmUp = 5;
  for (let i = 0; i < warmUp + 20; i++) {
    const a = loreftArtifact(1000 + i, config, all, 8, 'f7+l7');
    const meta = await store.putIntervention({
      tenantId: tenant.id,
      name: `first-use-${i}`,
      source: 'upload',
      config: JSON.parse(a.config),
      files: { config: new TextEncoder().encode(a.config), weights: a.weights },
    });
    ids.push(meta.id);
  }
  const cache = new InterventionCache(store, config, 1024 ** 3);
  const miss: number[] = [];
  const hit: number[] = [];
  // a running server has parsed interventions before: the first few here only warm up the JIT
  for (const id of ids.splice(0, warmUp)) await cache.resolve(tenant.id, id);
  for (const id of ids) {
    let t = performance.now();
    await cache.resolve(tenant.id, id);
    miss.push(performance.now() - t);
    t = performance.now();
    await cache.resolve(tenant.id, id);
    hit.push(performance.now() - t);
  }
  await store.close();
  rmSync(dir, { recursive: true, force: true });
  return { miss_ms: round(median(miss), 2), hit_ms: round(median(hit), 3) };
}

export async function benchServer(modelDir: string, config: ModelConfig, log: (s: string) => void) {
  const dataDir = mkdtempSync(join(tmpdir(), 'reft-bench-server-'));
  const server = await startServer(modelDir, dataDir);
  try {
    const rng = new Rng(5);
    const layers = [3, 10, 17, 24].map((l) => Math.min(l, config.numLayers - 1));
    const adapters: string[] = [];
    for (let i = 0; i < 32; i++) adapters.push(await upload(server.url, loreftArtifact(i, config, layers, 4, 'f3+l3'), `bench-${i}`));
    const body = (adapter?: string) => streamBody(rng, 64, adapter ? { adapter } : {});
    const paired = await pairedLoads(
      server.url,
      7,
      () => adapters.map(() => body()),
      () => adapters.map((a) => body(a)),
    );
    const single = await load(server.url, [body()]);
    const plain = paired.plain;
    const withIv = paired.steered;
    const ratios = paired.ratios('decode_tokens_s');
    const p = paired.middle(plain, 'decode_tokens_s');
    const v = paired.middle(withIv, 'decode_tokens_s');
    const ratio = median(ratios);
    log(
      `one stream: ${single.decode_tokens_s} tokens/s; 32 streams plain: ${p.decode_tokens_s}; 32 streams over 32 interventions: ${v.decode_tokens_s} (ratio ${round(ratio, 3)}, median of ${ratios.length} pairs; ${round(v.decode_tokens_s / single.decode_tokens_s, 2)}x one stream)`,
    );
    log(
      `32 streams with interventions: TTFT p50 ${v.ttft_ms.p50} ms p99 ${v.ttft_ms.p99} ms; inter-token p50 ${v.itl_ms.p50} ms p99 ${v.itl_ms.p99} ms`,
    );

    // first use over HTTP: a fresh rank-8 every-layer intervention vs the same one cached; each
    // request starts from an idle server (ORT's threads asleep), so neither rides the other's
    // warm-up, and the extra cost is the median of the pairs' differences
    const all = Array.from({ length: config.numLayers }, (_, l) => l);
    const extra: number[] = [];
    const timedRequest = async (body: unknown) => {
      await sleep(100);
      const t = performance.now();
      await stream(server.url, body);
      return performance.now() - t;
    };
    for (let i = 0; i < 20; i++) {
      const id = await upload(server.url, loreftArtifact(500 + i, config, all, 8, 'f7+l7'), `fresh-${i}`);
      const b = { input_ids: randomPrompt(rng), max_new_tokens: 1, adapter: id };
      const first = await timedRequest(b);
      extra.push(first - (await timedRequest(b)));
    }
    const inProcess = await firstUseInProcess(config);
    const httpExtra = median(extra);
    log(
      `first use of an uncached rank-8 every-layer intervention: ${inProcess.miss_ms} ms to load in process (cached lookup ${inProcess.hit_ms} ms); over HTTP a first-use request took ${round(httpExtra, 1)} ms more than the cached one (median of ${extra.length} pairs)`,
    );
    return {
      one_stream: single,
      streams32_plain: p,
      streams32_interventions: v,
      interventions_vs_plain: round(ratio, 3),
      interventions_vs_plain_pairs: ratios.map((r) => round(r, 3)),
      interventions_vs_one_stream: round(v.decode_tokens_s / single.decode_tokens_s, 2),
      all_runs: { plain: plain.map((r) => r.decode_tokens_s), interventions: withIv.map((r) => r.decode_tokens_s) },
      first_use_load_ms: inProcess.miss_ms,
      first_use_http_extra_ms: round(httpExtra, 1),
      cached_lookup_ms: inProcess.hit_ms,
    };
  } finally {
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}
