import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseLibDirs } from '../src/runtime/cuda/load.ts';
import { DEVICE_CHOICES, resolveDevice, type DeviceChoice } from '../src/runtime/device.ts';
import { StepRunner } from '../src/engine/step-runner.ts';
import { loadModel } from '../src/model/load.ts';
import { benchAgainstRevision } from './against-revision.ts';
import { benchEngine } from './engine.ts';
import { describeMachine } from './machine.ts';
import { benchGpu } from './gpu.ts';
import { LLAMA_1B_CONFIG, SMOL_135M_CONFIG, randomCheckpoint } from './random-checkpoint.ts';
import { benchServer } from './server.ts';
import { benchPrefixCache } from './prefix-cache.ts';
import { benchSteer } from './steer.ts';
import { benchStructured } from './structured.ts';
import { benchRecipeA, benchTrainingStep } from './training.ts';
import { benchWeights } from './weights.ts';

/**
 * `npm run bench [-- engine server steer training soak weights structured] [--device auto|cpu|webgpu|cuda]`: the speed targets of the issues, measured on a
 * random-weight checkpoint with SmolLM2-135M's shapes (generated once under bench/.work) and on
 * stories260k. `npm run bench -- gpu --device webgpu` (not in the default set: it needs a GPU
 * and llama.cpp's Vulkan build) runs issue 14's GPU comparison on the 135M shapes, or on
 * Llama-3.2-1B's with BENCH_GPU_MODEL=llama1b. Writes bench/results/<date>.{json,md} with the machine's description.
 */
const ROOT = join(import.meta.dirname, '..');
const STORIES = join(ROOT, '..', 'shared', 'models', 'stories260k');
const args = process.argv.slice(2);
// --device places the engine section's model (default auto, as the server's)
const deviceAt = args.indexOf('--device');
const deviceChoice = (deviceAt >= 0 ? args.splice(deviceAt, 2)[1] : 'auto') as DeviceChoice;
if (!DEVICE_CHOICES.includes(deviceChoice)) throw new Error(`--device must be one of ${DEVICE_CHOICES.join(', ')}`);
// --baseline <rev> compares the engine section against that revision of this repository, in the same run
const baselineAt = args.indexOf('--baseline');
const baselineRev = baselineAt >= 0 ? args.splice(baselineAt, 2)[1] : undefined;
const sections = args.length ? args : ['engine', 'server', 'steer', 'prefix', 'training', 'soak', 'weights'];

const lines: string[] = [];
const log = (s: string) => {
  lines.push(s);
  process.stderr.write(`${s}\n`);
};

const machine = describeMachine();
log(`machine: ${JSON.stringify(machine)}`);
// REFT_CUDA_LIB_DIR: --cuda-lib-dir (CUDA 13's libraries, loaded before ORT's CUDA provider)
const cudaLibDirs = parseLibDirs(process.env.REFT_CUDA_LIB_DIR);
const placement = await resolveDevice(deviceChoice, { cudaLibDirs });
log(`device: ${placement.device} (${placement.adapter})`);
const dir = await randomCheckpoint(join(ROOT, 'bench', '.work', 'smol135m-f32'), STORIES, SMOL_135M_CONFIG);
const model = await loadModel(dir);
const cacheDir = join(ROOT, 'bench', '.work', 'cache');
const results: Record<string, unknown> = { machine, device: placement };

if (sections.includes('engine') || sections.includes('training')) {
  const engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir, device: placement.device });
  if (sections.includes('engine')) {
    results.engine = await benchEngine(model, engine, join(ROOT, 'bench', '.work'), log);
    if (baselineRev) {
      const todayRunner = () => StepRunner.create(model.config, model.checkpoint, { cacheDir, device: placement.device });
      results.against_revision = await benchAgainstRevision(dir, model.config, todayRunner, baselineRev, join(ROOT, 'bench', '.work'), log);
    }
  }
  if (sections.includes('training')) {
    results.training = {
      recipe_a: await benchRecipeA(await loadModel(STORIES), log),
      step_135m: await benchTrainingStep(model, engine, log),
    };
  }
  await engine.close();
}
if (sections.includes('gpu')) {
  // BENCH_GPU_MODEL: smol135m (default), llama1b, or stories260k (a quick check of the bench itself)
  const which = process.env.BENCH_GPU_MODEL ?? 'smol135m';
  const gpuModel =
    which === 'llama1b'
      ? await loadModel(await randomCheckpoint(join(ROOT, 'bench', '.work', 'llama1b-f32'), STORIES, LLAMA_1B_CONFIG))
      : which === 'stories260k'
        ? await loadModel(STORIES)
        : model;
  // BENCH_GPU_DEVICES: ours on each of these (e.g. cuda,webgpu), default the --device resolved
  const placements = process.env.BENCH_GPU_DEVICES
    ? await Promise.all(
        [...new Set(process.env.BENCH_GPU_DEVICES.split(','))].map((d) => resolveDevice(d as DeviceChoice, { cudaLibDirs })),
      )
    : [placement];
  results.gpu = await benchGpu(gpuModel, { placements, cacheDir, cpu: which !== 'llama1b' && process.env.BENCH_GPU_CPU !== '0' }, log);
}
if (sections.includes('structured')) results.structured = await benchStructured(ROOT, log);
if (sections.includes('weights')) results.weights = await benchWeights(model, cacheDir, log);
if (sections.includes('server')) results.server = await benchServer(dir, model.config, log);
if (sections.includes('steer')) results.steer = await benchSteer(dir, model.config, log);
if (sections.includes('prefix')) results.prefix_cache = await benchPrefixCache(dir, model.config, log);
if (sections.includes('soak')) {
  // two servers and one worker on PostgreSQL (REFT_TEST_DATABASE_URL), on stories260k
  const { soakCluster } = await import('../test/support/cluster.ts');
  const soak = await soakCluster({
    seconds: Number(process.env.SOAK_SECONDS ?? 180),
    clients: 8,
    interventions: 32,
    jobEverySeconds: 10,
    log,
  });
  log(
    `soak: ${soak.seconds} s, ${soak.requests} requests, ${soak.failed} failed, ${soak.tokens_per_second} tokens/s, jobs ${soak.jobs.succeeded}/${soak.jobs.submitted} succeeded, RSS growth after warm-up ${soak.rss_growth_after_warmup_percent.join('% / ')}%`,
  );
  results.soak = soak;
}

(results.machine as Record<string, unknown>).load_average_1m_end = describeMachine().load_average_1m;
const stamp = new Date().toISOString().slice(0, 16).replace(/[:T]/g, '-');
await mkdir(join(ROOT, 'bench', 'results'), { recursive: true });
const base = join(ROOT, 'bench', 'results', `${stamp}-${sections.join('-')}`);
await writeFile(`${base}.json`, JSON.stringify(results, null, 2) + '\n');
await writeFile(`${base}.md`, `# Benchmark ${stamp}\n\n\`\`\`\n${lines.join('\n')}\n\`\`\`\n`);
log(`wrote ${base}.json and .md`);
