import { Command, Option } from 'commander';
import { writeArtifact } from '../interventions/directory.ts';
import { importPyreftDirectory } from '../interventions/pyreft/index.ts';
import { parsePositions } from '../interventions/positions.ts';
import { loadModelConfig } from '../model/load.ts';
import { DEFAULT_MODEL } from '../settings.ts';
import { modelDir, modelOption } from './model-option.ts';

/** `reft-server import-pyreft DIR --positions SPEC [--share-weights] --out DIR`. */
export function importPyreftCommand(): Command {
  return new Command('import-pyreft')
    .description(
      'convert a folder saved by pyreft (config.json + intkey_*.bin) into a reft/v1 artifact; the pickles are read as data, never executed',
    )
    .argument('<dir>', 'the folder ReftModel.save wrote')
    .requiredOption('--positions <spec>', "the positions it was trained with (fN, lN or fN+lN; pyreft doesn't store them)")
    .option(
      '--share-weights',
      'the interventions were trained with share_weights=True (one per layer for fN+lN) (default: false, as training)',
    )
    .option('--no-share-weights', 'share_weights=False: fN+lN split in two (the default)')
    .requiredOption('--out <dir>', 'where to write reft_config.json and reft_weights.safetensors')
    .option('--name <name>', 'name to record in reft_config.json')
    .addOption(
      new Option(
        modelOption().flags,
        "the base model it was trained on: only its config.json is read, for what pyreft's files don't record and reft_config.json's base_model needs (architecture, layer count, hidden size)",
      )
        .env('REFT_MODEL')
        .default(DEFAULT_MODEL),
    )
    .action(async (dir: string, flags: { positions: string; shareWeights?: boolean; out: string; name?: string; model: string }) => {
      parsePositions(flags.positions, '--positions');
      const config = await loadModelConfig(await modelDir(flags.model));
      const result = await importPyreftDirectory(
        dir,
        { positions: flags.positions, shareWeights: flags.shareWeights ?? false, name: flags.name },
        {
          hiddenSize: config.hiddenSize,
          numLayers: config.numLayers,
          architecture: config.architecture,
        },
      );
      await writeArtifact(flags.out, result);
      process.stderr.write(`wrote ${result.config.interventions.length} intervention(s) to ${flags.out}\n`);
    });
}
