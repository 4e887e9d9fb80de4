import { spawnSync } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { join } from 'node:path';
import { StepRunner } from '../src/engine/step-runner.ts';
import { argmax } from '../src/sampling/sampler.ts';
import type { LoadedModel } from '../src/model/load.ts';
import type { WeightFormat } from '../src/quant/formats.ts';
import { Rng } from '../src/rng.ts';
import { GGUF_TYPE, LlamaCppRunner, NODE_LLAMA_CPP_VERSION, ggufOf, nodeLlamaCpp } from './llama-cpp.ts';
import { median, round } from './machine.ts';

/**
 * Issue 15's weight formats on the 135M-shape model: for f32, q8 and q4, decode tokens/s at
 * batch 1 and 8 and a 512-token prefill (formats interleaved round by round, medians), and, each
 * in a process of its own, load time with an empty quantization cache and with a filled one,
 * and the resident memory once loaded. Beside each format, in the same rounds, llama.cpp
 * (node-llama-cpp) on the same weights as GGUF F32, Q8_0 and Q4_0 (bench/llama-cpp.ts), with
 * the same thread count; ratios are ours/llama.cpp speed, medians of each round's pair.
 */
const FORMATS: WeightFormat[] = ['f32', 'q8', 'q4'];

function prompt(seed: number, n: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 1 + Math.floor(rng.next() * (vocab - 1)));
}

const prompts = (batch: number, vocab: number) => Array.from({ length: batch }, (_, i) => prompt(i, 16, vocab));

async function decodeRate(engine: StepRunner, batch: number, steps: number, vocab: number): Promise<number> {
  const outs = await engine.prefill(prompts(batch, vocab).map((tokens) => ({ tokens })));
  let tokens = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  for (let i = 0; i < 2; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const t = performance.now();
  for (let i = 0; i < steps; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) engine.release(o.id);
  return (steps * batch) / seconds;
}

async function prefillMs(engine: StepRunner, n: number, vocab: number): Promise<number> {
  const t = performance.now();
  const [out] = await engine.prefill([{ tokens: prompt(99, n, vocab) }]);
  const ms = performance.now() - t;
  engine.release(out.id);
  return ms;
}

/** Load time and RSS of one format in a fresh process (bench/weights-load.ts). */
function loadInChild(modelDir: string, cacheDir: string, format: WeightFormat): { loadMs: number; rssBytes: number; cache: string | null } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'weights-load.ts'), modelDir, cacheDir, format], {
    encoding: 'utf8',
    env: { ...process.env },
  });
  if (r.status !== 0) throw new Error(`weights-load ${format} failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
}

/** BENCH_WEIGHTS_ROUNDS: more rounds narrow the medians (one round's b8 decode is 12 steps, a fraction of a second). */
const ROUNDS = Number(process.env.BENCH_WEIGHTS_ROUNDS ?? 5);

export async function benchWeights(model: LoadedModel, cacheDir: string, log: (s: string) => void, rounds = ROUNDS) {
  const vocab = model.config.vocabSize;
  // one cache per format, so the speed rounds' engines find the quantization the load measured
  const formatCache = (format: WeightFormat) => join(cacheDir, 'weights', format);
  // llama.cpp's side first, so a failed install or conversion stops the bench before the long loads
  const threads = availableParallelism(); // what our CPU sessions use (src/runtime/session.ts)
  const work = join(import.meta.dirname, '.work');
  const llama = await nodeLlamaCpp(join(work, 'llama'), threads);
  const ggufs = new Map<WeightFormat, string>();
  for (const format of FORMATS) ggufs.set(format, await ggufOf(model.dir, join(work, 'gguf'), GGUF_TYPE[format]));
  log(
    `llama.cpp: node-llama-cpp ${NODE_LLAMA_CPP_VERSION} (llama.cpp ${llama.llamaCppRelease.release}), ${threads} threads, GGUF ${[...ggufs.values()].join(', ')}`,
  );
  const load: Record<string, unknown> = {};
  // BENCH_WEIGHTS_LOAD=skip: only the speed rounds, on the caches a previous run left (minutes less)
  for (const format of process.env.BENCH_WEIGHTS_LOAD === 'skip' ? [] : FORMATS) {
    await rm(join(formatCache(format), 'quantized'), { recursive: true, force: true });
    const first = loadInChild(model.dir, formatCache(format), format);
    const cached = loadInChild(model.dir, formatCache(format), format);
    load[format] = { first_load_ms: round(first.loadMs), cached_load_ms: round(cached.loadMs), rss_mb: round(cached.rssBytes / 2 ** 20) };
    log(
      `weights ${format}: load ${round(first.loadMs)} ms (empty quantization cache), ${round(cached.loadMs)} ms (cached: ${cached.cache ?? 'n/a'}), RSS once loaded ${round(cached.rssBytes / 2 ** 20)} MiB`,
    );
  }
  const engines = new Map<WeightFormat, StepRunner>();
  for (const format of FORMATS)
    engines.set(format, await StepRunner.create(model.config, model.checkpoint, { cacheDir: formatCache(format), weights: format }));

  const runners = new Map<WeightFormat, LlamaCppRunner>();
  for (const format of FORMATS)
    runners.set(format, await LlamaCppRunner.open(llama, ggufs.get(format)!, { threads, sequences: 8, contextSize: 576 }));

  type Samples = { b1: number[]; b8: number[]; prefill: number[] };
  const empty = (): Samples => ({ b1: [], b8: [], prefill: [] });
  const ours = new Map(FORMATS.map((f) => [f, empty()]));
  const theirs = new Map(FORMATS.map((f) => [f, empty()]));
  const loadBefore = loadavg()[0];
  for (let r = 0; r < rounds; r++) {
    // rotate the order each round so no format always runs first; ours and llama.cpp alternate first
    for (const format of FORMATS.slice(r % FORMATS.length).concat(FORMATS.slice(0, r % FORMATS.length))) {
      const runOurs = async () => {
        const e = engines.get(format)!;
        const s = ours.get(format)!;
        s.b1.push(await decodeRate(e, 1, 24, vocab));
        s.b8.push(await decodeRate(e, 8, 12, vocab));
        s.prefill.push(await prefillMs(e, 512, vocab));
      };
      const runTheirs = async () => {
        const l = runners.get(format)!;
        const s = theirs.get(format)!;
        s.b1.push(await l.decodeRate(prompts(1, vocab), 24));
        s.b8.push(await l.decodeRate(prompts(8, vocab), 12));
        s.prefill.push(await l.prefillMs(prompt(99, 512, vocab)));
      };
      if (r % 2) await runTheirs().then(runOurs);
      else await runOurs().then(runTheirs);
    }
  }
  const loadAfter = loadavg()[0];
  const flashAttention = runners.get(FORMATS[0])!.flashAttention;
  log(`weights: load average (1 min) ${round(loadBefore)} before the speed rounds, ${round(loadAfter)} after`);

  const speed: Record<string, unknown> = {};
  const llamaFormats: Record<string, unknown> = {};
  const ratios: Record<string, unknown> = {};
  const roundRatios: Record<string, unknown> = {};
  // each round's pair: ours/llama.cpp tokens per second (for prefill, their ms over ours)
  const pairRatio = (a: number[], b: number[], inverse = false) => round(median(a.map((x, i) => (inverse ? b[i] / x : x / b[i]))));
  for (const format of FORMATS) {
    const s = ours.get(format)!;
    const t = theirs.get(format)!;
    const e = engines.get(format)!;
    const l = runners.get(format)!;
    const gguf = GGUF_TYPE[format].toUpperCase();
    speed[format] = {
      weight_bytes: e.weights.bytes,
      decode_b1_tokens_per_s: round(median(s.b1)),
      decode_b8_tokens_per_s: round(median(s.b8)),
      prefill_512_ms: round(median(s.prefill)),
    };
    llamaFormats[gguf] = {
      model_bytes: l.model.size,
      load_ms: round(l.loadMs),
      decode_b1_tokens_per_s: round(median(t.b1)),
      decode_b8_tokens_per_s: round(median(t.b8)),
      prefill_512_ms: round(median(t.prefill)),
    };
    const ratio = {
      decode_b1: pairRatio(s.b1, t.b1),
      decode_b8: pairRatio(s.b8, t.b8),
      prefill_512: pairRatio(s.prefill, t.prefill, true),
    };
    ratios[`${format}/${gguf}`] = ratio;
    // each round's pair, so a report shows the spread behind its medians
    const pairs = (a: number[], b: number[], inverse = false) => a.map((x, i) => round(inverse ? b[i] / x : x / b[i]));
    roundRatios[`${format}/${gguf}`] = {
      decode_b1: pairs(s.b1, t.b1),
      decode_b8: pairs(s.b8, t.b8),
      prefill_512: pairs(s.prefill, t.prefill, true),
    };
    log(
      `weights ${format}: ${round(e.weights.bytes / 2 ** 20)} MiB of weights; decode ${round(median(s.b1))} tok/s at batch 1, ${round(median(s.b8))} tok/s at batch 8; prefill of 512 tokens ${round(median(s.prefill))} ms (medians of ${rounds} interleaved rounds)`,
    );
    log(
      `llama.cpp ${gguf}: ${round(l.model.size / 2 ** 20)} MiB; decode ${round(median(t.b1))} tok/s at batch 1, ${round(median(t.b8))} tok/s at batch 8; prefill of 512 tokens ${round(median(t.prefill))} ms`,
    );
    log(
      `ours/llama.cpp ${format}/${gguf}: decode ${ratio.decode_b1}x at batch 1, ${ratio.decode_b8}x at batch 8, prefill ${ratio.prefill_512}x (medians of the rounds' ratios; b8 by round ${pairs(s.b8, t.b8).join(' ')})`,
    );
    await e.close();
    await l.close();
  }
  await llama.dispose();
  return {
    load,
    speed,
    llama_cpp: {
      node_llama_cpp: NODE_LLAMA_CPP_VERSION,
      llama_cpp_release: llama.llamaCppRelease.release,
      threads,
      flash_attention: flashAttention,
      formats: llamaFormats,
      ratios_ours_over_llama_cpp: ratios,
      round_ratios: roundRatios,
      load_average_1m: { before_rounds: round(loadBefore), after_rounds: round(loadAfter) },
    },
  };
}
