import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import type { Placement } from '../src/runtime/device.ts';
import type { PrefillInput, SequenceId } from '../src/engine/step-plan.ts';
import { StepRunner } from '../src/engine/step-runner.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { lowRank } from '../src/interventions/artifact.ts';
import { parsePositions } from '../src/interventions/positions.ts';
import { steer } from '../src/interventions/steer.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { Rng } from '../src/rng.ts';
import { LlamaCppRunner, NODE_LLAMA_CPP_VERSION, ggufOf, nodeLlamaCpp } from './llama-cpp.ts';
import { median, round } from './machine.ts';

/**
 * Issue 14's benchmark on a real GPU: our engine on each GPU device asked for (WebGPU: KV cache
 * on the device, greedy tokens picked on the device; CUDA (issue 24): the host-cache engine on
 * ORT's CUDA provider, which copies the past in every step) against llama.cpp's Vulkan build
 * (node-llama-cpp) on the same F32 weights as GGUF, and optionally our CPU engine, interleaved
 * round by round: decode tokens/s at batch 1, 8, 32 and 64, a 512-token prefill, and batch 32
 * with a different LoReFT per row against 32 plain rows (on the first device). Ratios are
 * medians of each round's ours/llama.cpp pair.
 */
export const GPU_BATCHES = [1, 8, 32, 64];
const PREFILL_TOKENS = 512;
const PROMPT_TOKENS = 16;
const NO_LOGITS: ReadonlySet<SequenceId> = new Set();

function prompt(seed: number, n: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 1 + Math.floor(rng.next() * (vocab - 1)));
}

const prompts = (batch: number, vocab: number) => Array.from({ length: batch }, (_, i) => prompt(i, PROMPT_TOKENS, vocab));

/** LoReFT rank 8 on 4 layers at f7+l7, different weights per `seed`, as a request would carry it. */
function intervention(seed: number, model: LoadedModel) {
  const d = model.config.hiddenSize;
  const rng = new Rng(seed);
  const rand = (n: number, s: number) => Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * s);
  const layers = [0.1, 0.35, 0.6, 0.85].map((f) => Math.floor(f * model.config.numLayers));
  const ivs = layers.map((layer, i) =>
    Object.assign(
      lowRank(
        { kind: 'loreft', layer, rank: 8, positions: parsePositions('f7+l7') },
        { rotate: rand(8 * d, 0.05), 'source.weight': rand(8 * d, 0.05), 'source.bias': rand(8, 0.1) },
        d,
      ),
      { key: `bench-${seed}#${i}` },
    ),
  );
  return steer(ivs);
}

/** Tokens/s of greedy decoding of `inputs` together: prefill, 2 steps unmeasured, `steps` timed. */
async function decodeRate(engine: StepRunner, inputs: PrefillInput[], steps: number): Promise<number> {
  const outs = await engine.prefill(inputs);
  let next = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  const step = async () => {
    const samples = await engine.decodeStep(next, NO_LOGITS);
    next = new Map([...samples].map(([id, s]) => [id, 'token' in s ? s.token : argmax(s.logits)]));
  };
  for (let i = 0; i < 2; i++) await step();
  const t = performance.now();
  for (let i = 0; i < steps; i++) await step();
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) engine.release(o.id);
  return (steps * inputs.length) / seconds;
}

async function prefillMs(engine: StepRunner, tokens: number[]): Promise<number> {
  const t = performance.now();
  const [out] = await engine.prefill([{ tokens }]);
  const ms = performance.now() - t;
  engine.release(out.id);
  return ms;
}

type Samples = Record<string, number[]>;
const push = (s: Samples, key: string, x: number) => (s[key] ??= []).push(x);
const medians = (s: Samples) => Object.fromEntries(Object.entries(s).map(([k, xs]) => [k, round(median(xs))]));
const stepsFor = (batch: number) => (batch === 1 ? 32 : 16);

export interface GpuBenchOptions {
  /** Where ours runs: each GPU device to measure (the first one also runs the steering pair). */
  placements: Placement[];
  cacheDir: string;
  /** Run our CPU engine beside (slow on large models). */
  cpu: boolean;
  rounds?: number;
}

export async function benchGpu(model: LoadedModel, opts: GpuBenchOptions, log: (s: string) => void) {
  const { config, checkpoint } = model;
  const vocab = config.vocabSize;
  const rounds = opts.rounds ?? Number(process.env.BENCH_GPU_ROUNDS ?? 3);
  const work = join(import.meta.dirname, '.work');
  const threads = availableParallelism();

  const engines: Array<{ device: string; adapter: string; engine: StepRunner; createMs: number }> = [];
  for (const p of opts.placements) {
    const t = performance.now();
    const engine = await StepRunner.create(config, checkpoint, { cacheDir: opts.cacheDir, device: p.device, deviceKvBudget: 8 * 2 ** 30 });
    engines.push({ device: p.device, adapter: p.adapter, engine, createMs: performance.now() - t });
    log(`gpu: ours on ${p.device} (${p.adapter}), engine created in ${round(engines.at(-1)!.createMs)} ms`);
  }
  const gpu = engines[0].engine;
  const cpu = opts.cpu ? await StepRunner.create(config, checkpoint, { cacheDir: opts.cacheDir, device: 'cpu' }) : null;

  // llama.cpp's side may fail where ours runs (no Vulkan device for it): ours is still measured
  const side = await openLlamaCpp(model, threads, work, log).catch((e: Error) => {
    log(`gpu: llama.cpp (Vulkan) unavailable, measuring ours alone: ${e.message}`);
    return null;
  });
  const runner = side?.runner;

  const ours: Record<string, Samples> = Object.fromEntries(engines.map((e) => [e.device, {}]));
  const theirs: Samples = {};
  const onCpu: Samples = {};
  const steering: Samples = {};
  const long = prompt(99, PREFILL_TOKENS, vocab);
  const plain32 = prompts(32, vocab).map((tokens) => ({ tokens }));
  const steered32 = plain32.map((x, i) => ({ ...x, interventions: intervention(i, model) }));
  // shaders compile and buffers are first allocated at each new shape: once, untimed
  for (const { engine } of engines) {
    for (const b of GPU_BATCHES)
      await decodeRate(
        engine,
        prompts(b, vocab).map((tokens) => ({ tokens })),
        2,
      );
    await prefillMs(engine, long);
  }
  await decodeRate(gpu, steered32, 2);
  /** One engine's decode at each batch size and its 512-token prefill, into `samples`. */
  const measure = async (engine: StepRunner, samples: Samples) => {
    for (const b of GPU_BATCHES)
      push(
        samples,
        `decode_b${b}`,
        await decodeRate(
          engine,
          prompts(b, vocab).map((tokens) => ({ tokens })),
          stepsFor(b),
        ),
      );
    push(samples, 'prefill_512_ms', await prefillMs(engine, long));
  };
  for (let r = 0; r < rounds; r++) {
    const runOurs = async () => {
      for (const { device, engine } of engines) await measure(engine, ours[device]);
    };
    const runTheirs = async () => {
      if (!runner) return;
      for (const b of GPU_BATCHES) push(theirs, `decode_b${b}`, await runner.decodeRate(prompts(b, vocab), stepsFor(b)));
      push(theirs, 'prefill_512_ms', await runner.prefillMs(long));
    };
    if (r % 2) await runTheirs().then(runOurs);
    else await runOurs().then(runTheirs);
    // 32 rows each with its own intervention against 32 plain rows, alternating first
    const pair = [
      async () => push(steering, 'plain_b32', await decodeRate(gpu, plain32, 16)),
      async () => push(steering, 'steered_b32', await decodeRate(gpu, steered32, 16)),
    ];
    for (const f of r % 2 ? pair.reverse() : pair) await f();
    if (cpu) await measure(cpu, onCpu);
    const last = (x: Samples) => GPU_BATCHES.map((b) => round(x[`decode_b${b}`]?.at(-1) ?? NaN)).join(' / ');
    log(
      `gpu: round ${r + 1}/${rounds}: decode tok/s at batch ${GPU_BATCHES.join('/')}: ${engines.map((e) => `ours (${e.device}) ${last(ours[e.device])}`).join(', ')}, llama.cpp ${last(theirs)}` +
        (cpu ? `, ours on the CPU ${last(onCpu)}` : '') +
        `; 32 steered ${round(steering.steered_b32.at(-1)!)} vs plain ${round(steering.plain_b32.at(-1)!)}`,
    );
  }

  const ratio = (mine: Samples, key: string, inverse = false) =>
    round(median(mine[key].map((x, i) => (inverse ? theirs[key][i] / x : x / theirs[key][i]))));
  const ratiosOf = (mine: Samples) =>
    Object.fromEntries([
      ...GPU_BATCHES.map((b) => [`decode_b${b}`, ratio(mine, `decode_b${b}`)]),
      ['prefill_512', ratio(mine, 'prefill_512_ms', true)],
    ]) as Record<string, number>;
  const steeredOverPlain = round(median(steering.steered_b32.map((x, i) => x / steering.plain_b32[i])));
  const line = (s: Samples) =>
    GPU_BATCHES.map((b) => `${round(median(s[`decode_b${b}`]))}`).join(' / ') +
    ` tok/s at batch ${GPU_BATCHES.join('/')}; prefill 512 ${round(median(s.prefill_512_ms))} ms`;
  for (const e of engines) log(`gpu: ours (${e.device}) ${line(ours[e.device])}`);
  if (runner) log(`gpu: llama.cpp (Vulkan) ${line(theirs)}`);
  if (cpu) log(`gpu: ours (CPU, ${threads} threads) ${line(onCpu)}`);
  if (runner)
    for (const e of engines) {
      const ratios = ratiosOf(ours[e.device]);
      log(
        `gpu: ours (${e.device})/llama.cpp ${GPU_BATCHES.map((b) => `${ratios[`decode_b${b}`]}x`).join(' / ')} at batch ${GPU_BATCHES.join('/')}, prefill ${ratios.prefill_512}x (medians of ${rounds} rounds' ratios)`,
      );
    }
  log(
    `gpu: 32 rows with 32 different LoReFT interventions (rank 8, 4 layers, f7+l7) on ${engines[0].device} ${round(median(steering.steered_b32))} tok/s vs 32 plain ${round(median(steering.plain_b32))} tok/s: ${steeredOverPlain}x`,
  );
  await runner?.close();
  await side?.llama.dispose();
  for (const { engine } of engines) await engine.close();
  await cpu?.close();
  return {
    model: { layers: config.numLayers, hidden: config.hiddenSize, vocab, weight_bytes: gpu.weights.bytes },
    ours: Object.fromEntries(
      engines.map((e) => [e.device, { adapter: e.adapter, engine_create_ms: round(e.createMs), ...medians(ours[e.device]) }]),
    ),
    llama_cpp_vulkan: side ? { ...side.description, ...medians(theirs) } : null,
    ours_cpu: cpu ? { threads, ...medians(onCpu) } : null,
    ratios_ours_over_llama_cpp: runner ? Object.fromEntries(engines.map((e) => [e.device, ratiosOf(ours[e.device])])) : null,
    steered_b32_over_plain_b32: steeredOverPlain,
    steering: medians(steering),
    rounds,
  };
}

/** llama.cpp's Vulkan build on the model's weights as GGUF F32, with room for the largest batch. */
async function openLlamaCpp(model: LoadedModel, threads: number, work: string, log: (s: string) => void) {
  const t = performance.now();
  const gguf = await ggufOf(model.dir, join(work, 'gguf'), 'f32');
  const ggufMs = performance.now() - t;
  const llama = await nodeLlamaCpp(join(work, 'llama-vulkan'), threads, 'vulkan');
  const gpuNames = await llama.getGpuDeviceNames();
  const runner = await LlamaCppRunner.open(llama, gguf, { threads, sequences: Math.max(...GPU_BATCHES), contextSize: PREFILL_TOKENS + 64 });
  log(
    `gpu: llama.cpp ${llama.llamaCppRelease.release} (node-llama-cpp ${NODE_LLAMA_CPP_VERSION}) on ${llama.gpu} [${gpuNames.join(', ')}], ` +
      `GGUF F32 ${round(runner.model.size / 2 ** 20)} MiB with ${runner.model.gpuLayers} layers on the GPU (converted in ${round(ggufMs)} ms), ` +
      `loaded in ${round(runner.loadMs)} ms, flash attention ${runner.flashAttention}`,
  );
  const description = {
    node_llama_cpp: NODE_LLAMA_CPP_VERSION,
    llama_cpp_release: llama.llamaCppRelease.release,
    gpu: llama.gpu,
    gpu_devices: gpuNames,
    gpu_layers: runner.model.gpuLayers,
    flash_attention: runner.flashAttention,
    load_ms: round(runner.loadMs),
  };
  return { llama, runner, description };
}
