import { InvalidArgumentError, Option } from 'commander';
import { parseLibDirs } from '../runtime/cuda/load.ts';
import { DEVICE_CHOICES, resolveDevice, type DeviceChoice, type Placement } from '../runtime/device.ts';
import { DEFAULT_TRAIN_MEMORY_BUDGET } from '../training/memory.ts';
import { WEIGHT_FORMATS, type WeightsFlag } from '../quant/formats.ts';

/** Option builders shared by the commands: every setting is a flag with an environment twin. */
export const intArg =
  (name: string, min = 0) =>
  (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer ≥ ${min}`);
    return n;
  };

const BYTE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
};

/** A byte count: a plain integer, or a number with a unit (KB/MB/GB decimal, KiB/MiB/GiB binary). */
export const bytesArg =
  (name: string, min = 1) =>
  (v: string) => {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$/i.exec(v);
    const n = m ? Math.floor(Number(m[1]) * BYTE_UNITS[(m[2] ?? '').toLowerCase()]) : NaN;
    if (!Number.isSafeInteger(n) || n < min)
      throw new InvalidArgumentError(`${name} must be a byte count ≥ ${min} (e.g. 1073741824, 1GiB, 512MiB)`);
    return n;
  };

export const numberArg = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
  return n;
};

export function envOption(flags: string, description: string, env: string, parse?: (v: string) => unknown, def?: unknown): Option {
  const o = new Option(flags, description).env(env);
  if (parse) o.argParser(parse);
  if (def !== undefined) o.default(def);
  return o;
}

/** The base model's weights: shared by `serve`, `worker`, `train` and `generate`. */
export const weightsOption = () =>
  envOption(
    '--weights <format>',
    "the base model's weights: auto (f32 on the CPU), f32, f16, q8 or q4 (8/4-bit blocks quantized at load, cached)",
    'REFT_WEIGHTS',
    undefined,
    'auto',
  ).choices([...WEIGHT_FORMATS]);

/** Where the store is: shared by `serve` and `worker`. */
export const storeOptions = () => [
  envOption('--data-dir <dir>', 'where the embedded store keeps its SQLite file and weight files', 'REFT_DATA_DIR', undefined, './data'),
  envOption(
    '--database <url>',
    'postgres://… to share tenants, interventions and jobs between hosts (default: the embedded store)',
    'REFT_DATABASE_URL',
  ),
];

/** The training worker's settings: shared by `worker` and the worker `serve` starts. */
export interface WorkerFlags {
  device: DeviceChoice;
  /** --cuda-lib-dir, as given (folders joined by ':'). */
  cudaLibDir?: string;
  weights: WeightsFlag;
  leaseMs: number;
  pollMs: number;
  checkpointMs: number;
  maxAttempts: number;
  jobMaxSteps: number;
  jobMaxSeconds: number;
  trainMemoryBudget: number;
}

export const workerOptions = () => [
  weightsOption(),
  deviceOption(),
  cudaLibDirOption(),
  envOption(
    '--lease-ms <ms>',
    'a claimed job is re-claimed this long after its worker stops heartbeating',
    'REFT_JOB_LEASE_MS',
    intArg('--lease-ms', 100),
    30_000,
  ),
  envOption('--poll-ms <ms>', 'how often an idle worker looks for jobs', 'REFT_JOB_POLL_MS', intArg('--poll-ms', 10), 1000),
  envOption(
    '--checkpoint-ms <ms>',
    'how often a running job saves a checkpoint',
    'REFT_JOB_CHECKPOINT_MS',
    intArg('--checkpoint-ms', 10),
    10_000,
  ),
  envOption('--max-attempts <n>', 'claims of one job before it fails', 'REFT_JOB_MAX_ATTEMPTS', intArg('--max-attempts', 1), 3),
  envOption('--job-max-steps <n>', 'step budget of a job', 'REFT_JOB_MAX_STEPS', intArg('--job-max-steps', 1), 1_000_000),
  envOption('--job-max-seconds <s>', 'time budget of a job', 'REFT_JOB_MAX_SECONDS', intArg('--job-max-seconds', 1), 86_400),
  trainMemoryBudgetOption(),
];

/**
 * Where the model runs: shared by `serve` (its engine and its worker), `worker`, `train` and
 * `generate`. `auto`: CUDA if its provider loads, else WebGPU on a hardware GPU, else the CPU.
 */
export const deviceOption = () =>
  envOption(
    '--device <device>',
    'where the model runs: auto (CUDA, else a hardware GPU through WebGPU, else the CPU), cpu, webgpu (also a software adapter such as llvmpipe) or cuda',
    'REFT_DEVICE',
    undefined,
    'auto',
  ).choices([...DEVICE_CHOICES]);

/**
 * Where CUDA 13's libraries are when the dynamic loader doesn't find them itself (not in
 * LD_LIBRARY_PATH or ldconfig's cache): shared by the commands that take --device.
 */
export const cudaLibDirOption = () =>
  envOption(
    '--cuda-lib-dir <dirs>',
    "folders (':'-separated) with CUDA 13's libraries for --device cuda/auto, e.g. pip's site-packages/nvidia/cu13/lib; loaded before ORT's CUDA provider",
    'REFT_CUDA_LIB_DIR',
  );

/**
 * Resolves --device for a command that runs the model in this process (`generate`, `train`),
 * loading --cuda-lib-dir's libraries if CUDA is taken. Where `auto` passed over a CUDA provider
 * that is installed (so CUDA was expected), one line on stderr says why; a machine that never
 * ran setup:cuda hears nothing.
 */
export async function placeForCommand(f: { device: DeviceChoice; cudaLibDir?: string }): Promise<Placement> {
  const placement = await resolveDevice(f.device, { cudaLibDirs: parseLibDirs(f.cudaLibDir) });
  const skipped = placement.cudaSkipped;
  if (skipped && skipped.code !== 'cuda_provider_missing')
    process.stderr.write(`reft-server: not using CUDA, running on ${placement.device}: ${skipped.reason}\n`);
  return placement;
}

/** Shared by `serve`, `worker` and `train`: batches are split into micro-batches to stay under it. */
export const trainMemoryBudgetOption = () =>
  envOption(
    '--train-memory-budget <bytes>',
    'bytes one training forward + backward pass may hold; larger batches are split (gradient accumulation), a row that alone exceeds it is refused',
    'REFT_TRAIN_MEMORY_BUDGET',
    intArg('--train-memory-budget', 1),
    DEFAULT_TRAIN_MEMORY_BUDGET,
  );

/** Turns parsed worker flags back into argv, to start a worker process with the same settings. */
export function workerArgv(f: WorkerFlags): string[] {
  return [
    '--device',
    f.device,
    ...(f.cudaLibDir ? ['--cuda-lib-dir', f.cudaLibDir] : []),
    '--weights',
    f.weights,
    '--lease-ms',
    String(f.leaseMs),
    '--poll-ms',
    String(f.pollMs),
    '--checkpoint-ms',
    String(f.checkpointMs),
    '--max-attempts',
    String(f.maxAttempts),
    '--job-max-steps',
    String(f.jobMaxSteps),
    '--job-max-seconds',
    String(f.jobMaxSeconds),
    '--train-memory-budget',
    String(f.trainMemoryBudget),
  ];
}
