import { readFile } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { SingleBar } from 'cli-progress';
import { cliOptionInvalid } from '../errors.ts';
import { parseJsonl, tokenizeTrainingRows } from '../jobs/data.ts';
import { writeArtifact } from '../interventions/directory.ts';
import { loadModel } from '../model/load.ts';
import { cacheDir } from '../settings.ts';
import { INTERVENTION_KINDS } from '../interventions/artifact.ts';
import { LR_SCHEDULERS, Trainer, type RecipeInput } from '../training/index.ts';
import { recipeSchema } from '../training/recipe.ts';
import { modelDir, modelOption } from './model-option.ts';
import type { DeviceChoice } from '../runtime/device.ts';
import { cudaLibDirOption, deviceOption, intArg, numberArg, trainMemoryBudgetOption, weightsOption, placeForCommand } from './options.ts';
import { resolveWeightFormat, type WeightsFlag } from '../quant/formats.ts';

/** `reft-server train data.jsonl --out DIR [recipe flags]`: train locally, write the artifact. */
interface Flags {
  model: string;
  out: string;
  kind?: string;
  rank?: number;
  layers?: string;
  positions?: string;
  shareWeights?: boolean;
  epochs?: number;
  maxSteps?: number;
  batchSize?: number;
  gradientAccumulationSteps?: number;
  learningRate?: number;
  lrScheduler?: string;
  warmupRatio?: number;
  weightDecay?: number;
  dropout?: number;
  seed?: number;
  name?: string;
  progress: boolean;
  trainMemoryBudget: number;
  device: DeviceChoice;
  cudaLibDir?: string;
  weights: WeightsFlag;
}

/** The recipe's defaults (the training API's), shown in --help; unset flags leave them to the recipe. */
const DEFAULTS = recipeSchema.parse({});
const d = (key: keyof typeof DEFAULTS) => ` (default: ${JSON.stringify(DEFAULTS[key])})`;

export function trainCommand(): Command {
  return new Command('train')
    .description('train an intervention on a JSONL file ({"prompt","completion"} or {"messages"} rows) and write the reft/v1 artifact')
    .argument('<data>', 'JSONL training data')
    .requiredOption('--out <dir>', 'where to write reft_config.json and reft_weights.safetensors')
    .addOption(modelOption())
    .addOption(trainMemoryBudgetOption())
    .addOption(deviceOption())
    .addOption(cudaLibDirOption())
    .addOption(weightsOption())
    .addOption(new Option('--kind <kind>', `intervention kind${d('kind')}`).choices([...INTERVENTION_KINDS]))
    .option('--rank <r>', `rank${d('rank')}`, intArg('--rank', 1))
    .option('--layers <list>', `comma-separated layers, or "all"${d('layers')}`)
    .option('--positions <spec>', `fN, lN or fN+lN${d('positions')}`)
    .option(
      '--share-weights',
      `one intervention per layer for fN+lN; without it, an fN and an lN one (as pyreft with share_weights=False)${d('share_weights')}`,
    )
    .option('--epochs <n>', `epochs${d('epochs')}`, intArg('--epochs', 1))
    .option('--max-steps <n>', 'stop after this many optimizer steps (default: the epochs decide)', intArg('--max-steps', 1))
    .option('--batch-size <n>', `batch size${d('batch_size')}`, intArg('--batch-size', 1))
    .option(
      '--gradient-accumulation-steps <n>',
      `batches per optimizer step${d('gradient_accumulation_steps')}`,
      intArg('--gradient-accumulation-steps', 1),
    )
    .option('--learning-rate <lr>', `peak learning rate${d('learning_rate')}`, numberArg('--learning-rate'))
    .addOption(new Option('--lr-scheduler <s>', `learning-rate schedule${d('lr_scheduler')}`).choices([...LR_SCHEDULERS]))
    .option('--warmup-ratio <r>', `share of steps warming up${d('warmup_ratio')}`, numberArg('--warmup-ratio'))
    .option('--weight-decay <w>', `AdamW weight decay${d('weight_decay')}`, numberArg('--weight-decay'))
    .option('--dropout <p>', `intervention dropout${d('dropout')}`, numberArg('--dropout'))
    .option('--seed <s>', `seed (same seed, same result)${d('seed')}`, intArg('--seed'))
    .option('--name <name>', 'name recorded in reft_config.json')
    .option('--no-progress', 'no progress bar')
    .action(runTrain);
}

function layersOf(v: string | undefined): RecipeInput['layers'] {
  if (v === undefined || v === 'all') return v as 'all' | undefined;
  const layers = v.split(',').map((s) => Number(s.trim()));
  if (layers.some((l) => !Number.isInteger(l) || l < 0))
    throw cliOptionInvalid({ option: 'layers', problem: 'must be "all" or a comma-separated list of layer numbers' }, 'layers');
  return layers;
}

async function runTrain(data: string, f: Flags): Promise<void> {
  const weights = resolveWeightFormat(f.weights);
  const model = await loadModel(await modelDir(f.model));
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await readFile(data));
  } catch {
    throw cliOptionInvalid({ option: 'data', problem: `cannot read ${data}` }, 'data');
  }
  const examples = tokenizeTrainingRows(parseJsonl(bytes, data), model.tokenizer, model.config.maxPositions, data);
  const recipe: RecipeInput = Object.fromEntries(
    Object.entries({
      kind: f.kind,
      rank: f.rank,
      layers: layersOf(f.layers),
      positions: f.positions,
      share_weights: f.shareWeights,
      epochs: f.epochs,
      max_steps: f.maxSteps,
      batch_size: f.batchSize,
      gradient_accumulation_steps: f.gradientAccumulationSteps,
      learning_rate: f.learningRate,
      lr_scheduler: f.lrScheduler,
      warmup_ratio: f.warmupRatio,
      weight_decay: f.weightDecay,
      dropout: f.dropout,
      seed: f.seed,
    }).filter(([, v]) => v !== undefined),
  ) as RecipeInput;
  const bar = f.progress
    ? new SingleBar({
        format: 'training |{bar}| {value}/{total} steps | loss {loss} | {tps} tok/s | eta {eta}s',
        stream: process.stderr,
        hideCursor: true,
      })
    : null;
  const { device } = await placeForCommand(f);
  const trainer = await Trainer.fromExamples(model, recipe, examples, {
    device,
    cacheDir: cacheDir(),
    weights,
    memoryBudget: f.trainMemoryBudget,
    artifact: f.name ? { name: f.name } : undefined,
    onProgress: (p) => {
      if (p.step === 1) bar?.start(p.totalSteps, 0, { loss: '-', tps: '-' });
      bar?.update(p.step, { loss: p.loss.toFixed(4), tps: Math.round(p.tokensPerSecond) });
    },
  });
  try {
    const outcome = await trainer.train();
    bar?.stop();
    if (outcome.status !== 'completed') throw new Error('training stopped before the end');
    await writeArtifact(f.out, {
      configBytes: new TextEncoder().encode(outcome.artifact.configJson),
      weightBytes: outcome.artifact.weights,
    });
    process.stderr.write(`trained ${outcome.steps} steps (final loss ${outcome.loss.toFixed(4)}); wrote ${f.out}\n`);
  } finally {
    await trainer.release();
  }
}
