import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rename, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { pathToFileURL } from 'node:url';

/**
 * llama.cpp beside our engine (issue 15's benchmark): node-llama-cpp's prebuilt CPU binary,
 * installed on demand into a folder of its own under bench/.work (never a dependency of the
 * project), running the same checkpoint written as GGUF by ../shared/tools/hf_to_gguf.py with
 * ggml's reference quantizers.
 */
export const NODE_LLAMA_CPP_VERSION = '3.22.1';

/** The GGUF type holding the same weights as each of our formats. */
export const GGUF_TYPE = { f32: 'f32', q8: 'q8_0', q4: 'q4_0' } as const;
export type GgufType = (typeof GGUF_TYPE)[keyof typeof GGUF_TYPE];

// The few parts of node-llama-cpp's API the bench calls (it is not installed where tsc looks).
interface Sequence {
  evaluate(tokens: number[], opts: { temperature: number; yieldEogToken: boolean }): AsyncGenerator<number, void, void>;
  clearHistory(): Promise<void>;
}
interface Context {
  readonly flashAttention: boolean | 'auto';
  getSequence(): Sequence;
  dispose(): Promise<void>;
}
interface Model {
  readonly size: number;
  /** Layers offloaded to the GPU (0 on the CPU build). */
  readonly gpuLayers: number;
  createContext(opts: { contextSize: number; sequences: number; batchSize: number; threads: number }): Promise<Context>;
  dispose(): Promise<void>;
}
interface Llama {
  readonly llamaCppRelease: { repo: string; release: string };
  /** The GPU backend in use, false on the CPU build. */
  readonly gpu: string | false;
  getGpuDeviceNames(): Promise<string[]>;
  loadModel(opts: { modelPath: string }): Promise<Model>;
  dispose(): Promise<void>;
}
interface NodeLlamaCpp {
  getLlama(opts: Record<string, unknown>): Promise<Llama>;
}

/** Which of node-llama-cpp's prebuilt binaries: the CPU build, or the Vulkan one for a GPU. */
export type LlamaCppBuild = 'cpu' | 'vulkan';

/** The npm package of `build`'s prebuilt binary for this platform. */
function prebuiltPackage(build: LlamaCppBuild): string {
  const platform = { darwin: 'mac', win32: 'win' }[process.platform as string] ?? process.platform;
  return `@node-llama-cpp/${platform}-${process.arch}${build === 'vulkan' ? '-vulkan' : ''}`;
}

/**
 * node-llama-cpp in `dir`, installed there first if missing (prebuilt binary only: no scripts,
 * no compiling). A folder carried to a machine without a registry (the GPU machine) is used as
 * it is when it holds the version and the build.
 */
export async function nodeLlamaCpp(dir: string, threads: number, build: LlamaCppBuild = 'cpu'): Promise<Llama> {
  const pkg = join(dir, 'node_modules', 'node-llama-cpp', 'package.json');
  const prebuilt = prebuiltPackage(build);
  const installed =
    existsSync(pkg) &&
    JSON.parse(readFileSync(pkg, 'utf8')).version === NODE_LLAMA_CPP_VERSION &&
    existsSync(join(dir, 'node_modules', prebuilt, 'package.json'));
  if (!installed) {
    await mkdir(dir, { recursive: true });
    if (!existsSync(join(dir, 'package.json'))) await writeFile(join(dir, 'package.json'), '{"name":"llama-cpp-bench","private":true}\n');
    // only this platform's build of the optional prebuilt binaries (the CUDA ones are large)
    const v = NODE_LLAMA_CPP_VERSION;
    const args = [
      'install',
      '--prefix',
      dir,
      '--no-audit',
      '--no-fund',
      '--ignore-scripts',
      '--omit=optional',
      `node-llama-cpp@${v}`,
      `${prebuilt}@${v}`,
    ];
    const r = spawnSync('npm', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    if (r.status !== 0) throw new Error(`npm ${args.join(' ')} failed: ${r.stderr}`);
  }
  const lib = (await import(pathToFileURL(join(dir, 'node_modules', 'node-llama-cpp', 'dist', 'index.js')).href)) as NodeLlamaCpp;
  return lib.getLlama({
    gpu: build === 'cpu' ? false : build,
    build: 'never',
    skipDownload: true,
    maxThreads: threads,
    logLevel: 'error',
    progressLogs: false,
  });
}

/** `modelDir` as GGUF of `type`, converted once into `dir` (again when the checkpoint is newer). */
export async function ggufOf(modelDir: string, dir: string, type: GgufType): Promise<string> {
  const out = join(dir, `${basename(modelDir)}-${type}.gguf`);
  const source = await stat(join(modelDir, 'model.safetensors'));
  const cached = await stat(out).catch(() => null);
  if (cached && cached.mtimeMs >= source.mtimeMs) return out;
  await mkdir(dir, { recursive: true });
  const script = join(import.meta.dirname, '..', '..', 'shared', 'tools', 'hf_to_gguf.py');
  const r = spawnSync('python3', [script, modelDir, `${out}.tmp`, '--type', type], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`hf_to_gguf.py ${type} failed: ${r.stderr}`);
  await rename(`${out}.tmp`, out);
  return out;
}

/** One GGUF file loaded with a context of `sequences` parallel sequences, measured as our engine is. */
export class LlamaCppRunner {
  private constructor(
    readonly model: Model,
    private readonly context: Context,
    private readonly sequences: Sequence[],
    readonly loadMs: number,
  ) {}

  static async open(
    llama: Llama,
    path: string,
    opts: { threads: number; sequences: number; contextSize: number },
  ): Promise<LlamaCppRunner> {
    const t = performance.now();
    const model = await llama.loadModel({ modelPath: path });
    const context = await model.createContext({
      contextSize: opts.contextSize,
      sequences: opts.sequences,
      batchSize: opts.contextSize,
      threads: opts.threads,
    });
    const sequences = Array.from({ length: opts.sequences }, () => context.getSequence());
    return new LlamaCppRunner(model, context, sequences, performance.now() - t);
  }

  get flashAttention(): boolean | 'auto' {
    return this.context.flashAttention;
  }

  /**
   * Tokens/s of greedy decoding, all `prompts` together (one batch per step, as node-llama-cpp
   * batches the sequences' pending tokens): prefill, 2 steps unmeasured, then `steps` timed.
   */
  async decodeRate(prompts: number[][], steps: number): Promise<number> {
    const gens = prompts.map((p, i) => this.sequences[i].evaluate(p, { temperature: 0, yieldEogToken: true }));
    const step = async () => {
      for (const r of await Promise.all(gens.map((g) => g.next()))) if (r.done) throw new Error('llama.cpp sequence ended early');
    };
    for (let i = 0; i < 3; i++) await step(); // the prompt's token, then 2 decode steps
    const t = performance.now();
    for (let i = 0; i < steps; i++) await step();
    const seconds = (performance.now() - t) / 1000;
    await this.reset(gens);
    return (steps * prompts.length) / seconds;
  }

  /**
   * Greedy decoding of `prompt` on the first sequence, a token per `step()`, for timing decode
   * steps in bursts beside another engine's; the prompt runs before this returns.
   */
  async stream(prompt: number[]): Promise<{ step(): Promise<void>; close(): Promise<void> }> {
    const gen = this.sequences[0].evaluate(prompt, { temperature: 0, yieldEogToken: true });
    const step = async () => {
      if ((await gen.next()).done) throw new Error('llama.cpp sequence ended early');
    };
    await step(); // the prompt's token
    return { step, close: () => this.reset([gen]) };
  }

  /** Milliseconds to evaluate `tokens` from an empty sequence up to the first sampled token. */
  async prefillMs(tokens: number[]): Promise<number> {
    const t = performance.now();
    const gen = this.sequences[0].evaluate(tokens, { temperature: 0, yieldEogToken: true });
    await gen.next();
    const ms = performance.now() - t;
    await this.reset([gen]);
    return ms;
  }

  private async reset(gens: AsyncGenerator<number, void, void>[]) {
    for (const g of gens) await g.return();
    for (const s of this.sequences) await s.clearHistory();
  }

  async close() {
    await this.context.dispose();
    await this.model.dispose();
  }
}
