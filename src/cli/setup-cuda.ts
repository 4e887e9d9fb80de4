import { Command } from 'commander';
import { cudaStatus, parseLibDirs } from '../runtime/cuda/load.ts';
import { SETUP_COMMAND } from '../runtime/cuda/provider.ts';
import { setupCudaProvider } from '../runtime/cuda/setup.ts';
import { cudaLibDirOption } from './options.ts';

interface Flags {
  from?: string;
  check: boolean;
  cudaLibDir?: string;
}

/**
 * `reft-server setup-cuda` (`npm run setup:cuda`): installs ORT's CUDA provider from the npm
 * registry beside onnxruntime-node (src/runtime/cuda/setup.ts), then says whether `--device cuda` would
 * run here and, if not, why (the same one line `--device cuda` stops with).
 */
export function setupCudaCommand(): Command {
  return new Command('setup-cuda')
    .description(`install ORT's CUDA provider from the npm registry beside onnxruntime-node (${SETUP_COMMAND}), then check it`)
    .option('--from <tarball>', "the provider package's tarball, already here (for a machine without the registry)")
    .option('--no-check', 'install only; skip the check that CUDA runs here')
    .addOption(cudaLibDirOption())
    .action(runSetupCuda);
}

async function runSetupCuda(f: Flags): Promise<void> {
  const say = (line: string) => process.stdout.write(`setup-cuda: ${line}\n`);
  await setupCudaProvider({ tarball: f.from, log: say });
  if (!f.check) return;
  say('checking that ORT can run on CUDA here (a one-node session)');
  const status = await cudaStatus({ libDirs: parseLibDirs(f.cudaLibDir) });
  if (status.ok) say(`CUDA works: --device cuda runs on ${status.gpu}`);
  // installed, but this machine can't run it (yet): say why, and still succeed
  else say(`installed, but --device cuda can't run here yet: ${status.error.message}`);
}
