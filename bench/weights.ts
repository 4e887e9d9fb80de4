import { spawnSync } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Engine } from '../src/engine/engine.ts';
import { argmax } from '../src/engine/sampler.ts';
import type { LoadedModel } from '../src/model/load.ts';
import type { WeightFormat } from '../src/quant/formats.ts';
import { Rng } from '../src/rng.ts';
import { median, round } from './machine.ts';

/**
 * Issue 15's weight formats on the 135M-shape model: for f32, q8 and q4, decode tokens/s at
 * batch 1 and 8 and a 512-token prefill (formats interleaved round by round, medians), and, each
 * in a process of its own, load time with an empty quantization cache and with a filled one,
 * and the resident memory once loaded.
 */
const FORMATS: WeightFormat[] = ['f32', 'q8', 'q4'];

function prompt(seed: number, n: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 1 + Math.floor(rng.next() * (vocab - 1)));
}

async function decodeRate(engine: Engine, batch: number, steps: number, vocab: number): Promise<number> {
  const outs = await engine.prefill(Array.from({ length: batch }, (_, i) => ({ tokens: prompt(i, 16, vocab) })));
  let tokens = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  for (let i = 0; i < 2; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const t = performance.now();
  for (let i = 0; i < steps; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) engine.release(o.id);
  return (steps * batch) / seconds;
}

async function prefillMs(engine: Engine, n: number, vocab: number): Promise<number> {
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

export async function benchWeights(model: LoadedModel, cacheDir: string, log: (s: string) => void, rounds = 5) {
  const vocab = model.config.vocabSize;
  const load: Record<string, unknown> = {};
  for (const format of FORMATS) {
    await rm(join(cacheDir, 'quantized'), { recursive: true, force: true });
    const first = loadInChild(model.dir, cacheDir, format);
    const cached = loadInChild(model.dir, cacheDir, format);
    load[format] = { first_load_ms: round(first.loadMs), cached_load_ms: round(cached.loadMs), rss_mb: round(cached.rssBytes / 2 ** 20) };
    log(
      `weights ${format}: load ${round(first.loadMs)} ms (empty quantization cache), ${round(cached.loadMs)} ms (cached: ${cached.cache ?? 'n/a'}), RSS once loaded ${round(cached.rssBytes / 2 ** 20)} MiB`,
    );
  }
  const engines = new Map<WeightFormat, Engine>();
  for (const format of FORMATS) engines.set(format, await Engine.create(model.config, model.checkpoint, { cacheDir, weights: format }));
  const samples = new Map(FORMATS.map((f) => [f, { b1: [] as number[], b8: [] as number[], prefill: [] as number[] }]));
  for (let r = 0; r < rounds; r++) {
    // rotate the order each round so no format always runs first
    for (const format of FORMATS.slice(r % FORMATS.length).concat(FORMATS.slice(0, r % FORMATS.length))) {
      const e = engines.get(format)!;
      const s = samples.get(format)!;
      s.b1.push(await decodeRate(e, 1, 24, vocab));
      s.b8.push(await decodeRate(e, 8, 12, vocab));
      s.prefill.push(await prefillMs(e, 512, vocab));
    }
  }
  const speed: Record<string, unknown> = {};
  for (const format of FORMATS) {
    const s = samples.get(format)!;
    const e = engines.get(format)!;
    speed[format] = {
      weight_bytes: e.weights.bytes,
      decode_b1_tokens_per_s: round(median(s.b1)),
      decode_b8_tokens_per_s: round(median(s.b8)),
      prefill_512_ms: round(median(s.prefill)),
    };
    log(
      `weights ${format}: ${round(e.weights.bytes / 2 ** 20)} MiB of weights; decode ${round(median(s.b1))} tok/s at batch 1, ${round(median(s.b8))} tok/s at batch 8; prefill of 512 tokens ${round(median(s.prefill))} ms (medians of ${rounds} interleaved rounds)`,
    );
    await e.close();
  }
  return { load, speed, llama_cpp: 'not measured: the node-llama-cpp comparison of issue 15 is not built yet' };
}
