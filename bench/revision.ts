import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { LoadedModel } from '../src/model/load.ts';
import type { StepRunner } from '../src/engine/step-runner.ts';

/**
 * Another revision of this repository beside the checkout, to measure today's code against it in
 * the same run (the machine is too noisy to compare runs): its tree is extracted once under
 * bench/.work/rev-<sha> and shares this checkout's node_modules.
 */
const ROOT = join(import.meta.dirname, '..');

export function revisionTree(rev: string): { dir: string; sha: string } {
  const sha = execFileSync('git', ['rev-parse', '--verify', `${rev}^{commit}`], { cwd: ROOT, encoding: 'utf8' }).trim();
  const dir = join(ROOT, 'bench', '.work', `rev-${sha.slice(0, 12)}`);
  if (!existsSync(join(dir, 'package.json'))) {
    mkdirSync(dir, { recursive: true });
    execFileSync('sh', ['-c', `git archive ${sha} | tar -x -C "${dir}"`], { cwd: ROOT });
    symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  }
  return { dir, sha };
}

/** The decode API both generations of the engine have (the host-KV `Engine` before, `StepRunner` since). */
export type DecodeRunner = Pick<StepRunner, 'prefill' | 'decode' | 'release' | 'close'>;

/** A revision's engine over its own model loader, on the CPU. */
export async function revisionRunner(dir: string, modelDir: string, cacheDir: string): Promise<DecodeRunner> {
  const load = (await import(pathToFileURL(join(dir, 'src', 'model', 'load.ts')).href)) as { loadModel(d: string): Promise<LoadedModel> };
  const model = await load.loadModel(modelDir);
  const runnerFile = join(dir, 'src', 'engine', 'step-runner.ts');
  const module = existsSync(runnerFile)
    ? ((await import(pathToFileURL(runnerFile).href)) as { StepRunner: typeof StepRunner }).StepRunner
    : ((await import(pathToFileURL(join(dir, 'src', 'engine', 'engine.ts')).href)) as { Engine: typeof StepRunner }).Engine;
  return module.create(model.config, model.checkpoint, { cacheDir });
}
