import { availableParallelism, loadavg } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { PrefillInput } from '../src/engine/step-plan.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { Rng } from '../src/rng.ts';
import { lowRank, type LowRankIntervention } from '../src/interventions/artifact.ts';
import { parsePositions } from '../src/interventions/positions.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { inPairs, median, pairRatios, round } from './machine.ts';
import { bandwidthProbe, gemvProbe, type Probe } from './probes.ts';
import { hugePages } from '../src/runtime/huge-pages.ts';
import { GGUF_TYPE, LlamaCppRunner, NODE_LLAMA_CPP_VERSION, ggufOf, nodeLlamaCpp } from './llama-cpp.ts';

/**
 * Issue 2's engine benchmark on the 135M-shape model: decode at batch 1 and 8 next to the
 * memory-bandwidth ceiling measured in the same run, prefill overhead of interventions, and
 * decode after an intervened prompt vs a plain one. Variants are interleaved and medians
 * reported, since the machine is shared.
 */
/** Bytes of weights one decode step reads: every matrix once (the embedding as the LM head). */
export function weightBytesPerStep(model: LoadedModel): number {
  let bytes = 0;
  for (const w of model.checkpoint.weights.values()) {
    if (w.name === 'model.embed_tokens.weight' && !model.config.tieWordEmbeddings) continue; // only one row is gathered
    bytes += (w.byteLength / (w.dtype === 'F32' ? 4 : 2)) * 4;
  }
  return bytes;
}

function randomIntervention(seed: number, layer: number, rank: number, positions: string, d: number): LowRankIntervention {
  const rng = new Rng(seed);
  const rand = (n: number, s: number) => Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * s);
  // orthonormal rows are not needed for timing; the shapes and kinds are what matter
  return lowRank(
    { kind: 'loreft', layer, rank, positions: parsePositions(positions) },
    { rotate: rand(rank * d, 0.05), 'source.weight': rand(rank * d, 0.05), 'source.bias': rand(rank, 0.1) },
    d,
  );
}

function prompt(seed: number, n: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 1 + Math.floor(rng.next() * (vocab - 1)));
}

/** tokens/s of `steps` decode steps over a fresh batch. */
async function decodeRate(engine: StepRunner, inputs: PrefillInput[], steps: number): Promise<number> {
  const outs = await engine.prefill(inputs);
  let tokens = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  for (let i = 0; i < 3; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const t = performance.now();
  for (let i = 0; i < steps; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) engine.release(o.id);
  return (steps * inputs.length) / seconds;
}

interface PairedSamples {
  /** One probe run's bytes/s each, in time order. */
  bandwidths: number[];
  /** One run of the single-GEMV probe after each bandwidth probe, bytes/s. */
  gemv: number[];
  /** Batch-1 decode step times in ms, `STEPS_PER_PROBE` per probe run, in time order. */
  stepMs: number[];
}

const STEPS_PER_PROBE = 3;

/**
 * Alternates one bandwidth probe run, one run of the single-GEMV probe and a few timed batch-1
 * decode steps, `samples` times.
 */
async function decodeAgainstBandwidth(
  engine: StepRunner,
  probe: Probe,
  gemv: Probe,
  vocab: number,
  samples: number,
): Promise<PairedSamples> {
  const bandwidths: number[] = [];
  const gemvRates: number[] = [];
  const stepMs: number[] = [];
  let sequence: { id: number; token: number } | undefined;
  for (let i = 0; i < samples; i++) {
    if (!sequence || i % 20 === 0) {
      if (sequence) engine.release(sequence.id);
      const [out] = await engine.prefill([{ tokens: prompt(i, 16, vocab) }]);
      sequence = { id: out.id, token: argmax(out.logits) };
    }
    // ORT's pool threads spin for ~35 ms after a run (measured); let them sleep before probing,
    // or the probe shares a core with them and the ceiling comes out low
    await sleep(60);
    bandwidths.push(await probe.once());
    gemvRates.push(await gemv.once());
    for (let k = 0; k < STEPS_PER_PROBE; k++) {
      const t = performance.now();
      const logits = (await engine.decode(new Map([[sequence.id, sequence.token]]))).get(sequence.id)!;
      stepMs.push(performance.now() - t);
      sequence.token = argmax(logits);
    }
  }
  if (sequence) engine.release(sequence.id);
  return { bandwidths, gemv: gemvRates, stepMs };
}

/** Within each quarter of the samples: decode's ratio to the ceiling and the GEMV's to the probe. */
function quartersOf(p: PairedSamples, weightBytes: number): Array<{ decode: number; gemv: number }> {
  const n = p.bandwidths.length / 4;
  return [0, 1, 2, 3].map((q) => {
    const bw = median(p.bandwidths.slice(q * n, (q + 1) * n));
    const ms = median(p.stepMs.slice(q * n * STEPS_PER_PROBE, (q + 1) * n * STEPS_PER_PROBE));
    return { decode: 1000 / ms / (bw / weightBytes), gemv: median(p.gemv.slice(q * n, (q + 1) * n)) / bw };
  });
}

/** Times of `steps` decode steps (ms each) after prefilling `input` alone. */
async function decodeSteps(engine: StepRunner, input: PrefillInput, steps: number): Promise<number[]> {
  const [out] = await engine.prefill([input]);
  let token = argmax(out.logits);
  const times: number[] = [];
  for (let i = 0; i < steps; i++) {
    const t = performance.now();
    token = argmax((await engine.decode(new Map([[out.id, token]]))).get(out.id)!);
    times.push(performance.now() - t);
  }
  engine.release(out.id);
  return times;
}

async function prefillSeconds(engine: StepRunner, input: PrefillInput): Promise<number> {
  const t = performance.now();
  const [out] = await engine.prefill([input]);
  const seconds = (performance.now() - t) / 1000;
  engine.release(out.id);
  return seconds;
}

export async function benchEngine(model: LoadedModel, engine: StepRunner, workDir: string, log: (s: string) => void) {
  const { config } = model;
  const d = config.hiddenSize;
  const weightBytes = weightBytesPerStep(model);
  // The machine is shared and its memory bandwidth drifts by a third within seconds, so single
  // probe runs and short bursts of decode steps alternate, and the ceiling and the decode rate
  // are medians over the same stretch of time.
  const probe = await bandwidthProbe(2);
  const gemv = await gemvProbe(weightBytes, d, 2, workDir);
  const paired = await decodeAgainstBandwidth(engine, probe, gemv, config.vocabSize, 160);
  await probe.release();
  await gemv.release();
  const gemvRatio = median(paired.gemv) / median(paired.bandwidths);
  const bandwidth = median(paired.bandwidths);
  const ceiling = bandwidth / weightBytes;
  const decode1 = 1000 / median(paired.stepMs);
  const ratio = decode1 / ceiling;
  const quarters = quartersOf(paired, weightBytes);
  const b8: number[] = [];
  for (let rep = 0; rep < 5; rep++)
    b8.push(
      await decodeRate(
        engine,
        Array.from({ length: 8 }, (_, i) => ({ tokens: prompt(10 * rep + i, 16, config.vocabSize) })),
        32,
      ),
    );
  const decode8 = median(b8);
  log(
    `read bandwidth (2 threads): ${round(bandwidth / 1e9)} GB/s; weights per step ${round(weightBytes / 1e6, 1)} MB; ceiling ${round(ceiling, 1)} tokens/s; huge pages ${hugePages()}`,
  );
  log(
    `decode batch 1: ${round(decode1, 1)} tokens/s, ${round(ratio)} of the ceiling (by quarter of the run: ${quarters.map((q) => round(q.decode)).join(', ')}); batch 8: ${round(decode8, 1)} tokens/s aggregate`,
  );
  log(
    `one matrix-vector product over the same ${round(weightBytes / 1e6, 1)} MB in one matrix (ORT's best case for these bytes): ${round(median(paired.gemv) / 1e9)} GB/s, ${round(gemvRatio)} of the probe (by quarter: ${quarters.map((q) => round(q.gemv)).join(', ')})`,
  );

  const long = prompt(99, 512, config.vocabSize);
  const ivs = [3, 10, 17, 24].map((layer, i) => randomIntervention(i, Math.min(layer, config.numLayers - 1), 8, 'f7+l7', d));
  await prefillSeconds(engine, { tokens: long });
  const prefill = await inPairs(
    25,
    () => prefillSeconds(engine, { tokens: long }),
    () => prefillSeconds(engine, { tokens: long, interventions: ivs }),
  );
  const prefillPlain = 512 / median(prefill.a);
  const prefillIv = 512 / median(prefill.b);
  const prefillOverhead = median(pairRatios(prefill)) - 1;
  log(
    `prefill 512 tokens: ${round(prefillPlain, 1)} tokens/s plain, ${round(prefillIv, 1)} with LoReFT r8 on 4 layers f7+l7: overhead ${round(prefillOverhead * 100, 2)}% (median of ${prefill.a.length} pairs)`,
  );

  // The same prompt with and without interventions, in bursts of 4 decode steps.
  const promptTokens = prompt(7, 64, config.vocabSize);
  const burst = async (interventions: LowRankIntervention[]) =>
    median(await decodeSteps(engine, { tokens: promptTokens, interventions }, 4));
  const after = await inPairs(
    120,
    () => burst([]),
    () => burst(ivs),
  );
  const decodeRatio = 1 / median(pairRatios(after));
  log(
    `decode after an intervened prompt vs a plain one: ${round(1000 / median(after.b), 1)} vs ${round(1000 / median(after.a), 1)} tokens/s (ratio ${round(decodeRatio, 3)}, median of ${after.a.length} pairs)`,
  );

  const longContext = await benchLongContext(model, engine, workDir, log);

  return {
    read_bandwidth_gb_s: round(bandwidth / 1e9),
    weight_bytes_per_step: weightBytes,
    ceiling_tokens_s: round(ceiling, 1),
    decode_batch1_tokens_s: round(decode1, 1),
    decode_batch1_of_ceiling: round(ratio),
    decode_batch8_tokens_s: round(decode8, 1),
    huge_pages: hugePages(),
    single_gemv_of_bandwidth: round(gemvRatio),
    decode_runs: {
      batch1_of_ceiling_by_quarter: quarters.map((q) => round(q.decode)),
      single_gemv_of_bandwidth_by_quarter: quarters.map((q) => round(q.gemv)),
      batch8: b8.map((x) => round(x, 1)),
      bandwidth_samples: paired.bandwidths.length,
      decode_steps: paired.stepMs.length,
    },
    prefill512_plain_tokens_s: round(prefillPlain, 1),
    prefill512_loreft_tokens_s: round(prefillIv, 1),
    prefill_overhead_percent: round(prefillOverhead * 100, 2),
    decode_after_intervened_prompt_tokens_s: round(1000 / median(after.b), 1),
    decode_after_plain_prompt_tokens_s: round(1000 / median(after.a), 1),
    decode_after_intervention_ratio: round(decodeRatio, 3),
    long_context: longContext,
  };
}

/** A sequence decoding greedily, a token per `step()`: ours or llama.cpp's. */
interface DecodeStream {
  step(): Promise<void>;
  close(): Promise<void>;
}

async function ourStream(engine: StepRunner, tokens: number[]): Promise<DecodeStream> {
  const [out] = await engine.prefill([{ tokens }]);
  let token = argmax(out.logits);
  return {
    step: async () => {
      token = argmax((await engine.decode(new Map([[out.id, token]]))).get(out.id)!);
    },
    close: async () => engine.release(out.id),
  };
}

/**
 * Median milliseconds of `steps` decode steps of `stream`, after a pause (ORT's pool threads
 * spin for ~35 ms after a run, llama.cpp's too, and would share the cores with the other
 * engine's burst) and one untimed step.
 */
async function burstMs(stream: DecodeStream, steps: number): Promise<number> {
  await sleep(60);
  await stream.step();
  const times: number[] = [];
  for (let i = 0; i < steps; i++) {
    const t = performance.now();
    await stream.step();
    times.push(performance.now() - t);
  }
  return median(times);
}

const SHORT_CONTEXT = 32;
/** BENCH_LONG_CONTEXTS: the long prompts' lengths; BENCH_LONG_ROUNDS: paired rounds for each. */
const LONG_CONTEXTS = (process.env.BENCH_LONG_CONTEXTS ?? '2000,4000').split(',').map(Number);
const LONG_ROUNDS = Number(process.env.BENCH_LONG_ROUNDS ?? 12);
const BURST_STEPS = 4;

/**
 * Issue 23's long-context goals: batch-1 decode after a 2,000- and a 4,000-token prompt, ours
 * beside llama.cpp (node-llama-cpp on the same F32 weights as GGUF, the same threads), and
 * beside both engines' decode after a 32-token prompt, so that each ratio is a median of pairs
 * measured next to each other. Four sequences stay live while their bursts rotate round by
 * round: our long one in `engine`, our short one in an engine of its own (an engine steps all
 * its sequences together), and one in each of two llama.cpp contexts.
 */
export async function benchLongContext(model: LoadedModel, engine: StepRunner, workDir: string, log: (s: string) => void) {
  const threads = availableParallelism(); // what our CPU sessions use (src/engine/session.ts)
  const llama = await nodeLlamaCpp(join(workDir, 'llama'), threads);
  const gguf = await ggufOf(model.dir, join(workDir, 'gguf'), GGUF_TYPE.f32);
  const margin = LONG_ROUNDS * (BURST_STEPS + 1) + 16; // the tokens the bursts add
  const longRunner = await LlamaCppRunner.open(llama, gguf, { threads, sequences: 1, contextSize: Math.max(...LONG_CONTEXTS) + margin });
  const shortRunner = await LlamaCppRunner.open(llama, gguf, { threads, sequences: 1, contextSize: SHORT_CONTEXT + margin });
  const shortEngine = await StepRunner.create(model.config, model.checkpoint, { cacheDir: join(workDir, 'cache') });
  const vocab = model.config.vocabSize;
  log(
    `long context: llama.cpp ${llama.llamaCppRelease.release} (node-llama-cpp ${NODE_LLAMA_CPP_VERSION}, flash attention ${longRunner.flashAttention}), ${threads} threads, GGUF F32; bursts of ${BURST_STEPS} steps, ${LONG_ROUNDS} rounds a length`,
  );
  const results: Record<string, unknown> = {};
  const tokensPerSecond = (ms: number[]) => round(1000 / median(ms), 1);
  /** Median of the rounds' a/b (ms over ms: b's speed over a's). */
  const paired = (a: number[], b: number[]) => round(median(a.map((x, i) => x / b[i])), 3);
  for (const n of LONG_CONTEXTS) {
    const longPrompt = prompt(1000 + n, n, vocab);
    const shortPrompt = prompt(1000 + SHORT_CONTEXT, SHORT_CONTEXT, vocab);
    const streams = {
      ours: await ourStream(engine, longPrompt),
      llama: await longRunner.stream(longPrompt),
      oursShort: await ourStream(shortEngine, shortPrompt),
      llamaShort: await shortRunner.stream(shortPrompt),
    };
    const keys = Object.keys(streams) as Array<keyof typeof streams>;
    const ms = Object.fromEntries(keys.map((k) => [k, [] as number[]])) as Record<keyof typeof streams, number[]>;
    const loadBefore = loadavg()[0];
    for (let r = 0; r < LONG_ROUNDS; r++) {
      for (const k of keys.slice(r % keys.length).concat(keys.slice(0, r % keys.length)))
        ms[k].push(await burstMs(streams[k], BURST_STEPS));
    }
    const loadAfter = loadavg()[0];
    for (const k of keys) await streams[k].close();
    const block = {
      ours_tokens_s: tokensPerSecond(ms.ours),
      llama_cpp_tokens_s: tokensPerSecond(ms.llama),
      ours_over_llama_cpp: paired(ms.llama, ms.ours),
      short_ours_tokens_s: tokensPerSecond(ms.oursShort),
      short_llama_cpp_tokens_s: tokensPerSecond(ms.llamaShort),
      short_ours_over_llama_cpp: paired(ms.llamaShort, ms.oursShort),
      ours_over_our_short: paired(ms.oursShort, ms.ours),
      llama_cpp_over_its_short: paired(ms.llamaShort, ms.llama),
      round_ratios_ours_over_llama_cpp: ms.ours.map((x, i) => round(ms.llama[i] / x, 3)),
      load_average_1m: { before: round(loadBefore), after: round(loadAfter) },
    };
    results[String(n)] = block;
    log(
      `decode after ${n} tokens: ours ${block.ours_tokens_s} tokens/s, llama.cpp ${block.llama_cpp_tokens_s}: ${block.ours_over_llama_cpp}x; after ${SHORT_CONTEXT} tokens: ours ${block.short_ours_tokens_s}, llama.cpp ${block.short_llama_cpp_tokens_s}: ${block.short_ours_over_llama_cpp}x; ${n} over ${SHORT_CONTEXT} tokens: ours ${block.ours_over_our_short}x, llama.cpp ${block.llama_cpp_over_its_short}x (medians of ${LONG_ROUNDS} rounds' ratios; load ${block.load_average_1m.before}-${block.load_average_1m.after})`,
    );
  }
  await shortEngine.close();
  await longRunner.close();
  await shortRunner.close();
  await llama.dispose();
  return { llama_cpp_release: llama.llamaCppRelease.release, threads, burst_steps: BURST_STEPS, rounds: LONG_ROUNDS, contexts: results };
}
