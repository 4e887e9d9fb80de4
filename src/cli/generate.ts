import { Command, InvalidArgumentError, Option } from 'commander';
import { EngineClient } from '../engine/engine-client.ts';
import { promptInput, tokenize } from '../prompts/prompt-input.ts';
import { generateOptionsSchema, toGenerationRequest } from '../server/generation-request.ts';
import { DEFAULT_LIMITS } from '../engine/scheduler.ts';
import { cliOptionInvalid, firstIssue } from '../errors.ts';
import { readArtifactDir } from '../interventions/directory.ts';
import { loadModel } from '../model/load.ts';
import { cacheDir } from '../settings.ts';
import { modelDir, modelOption } from './model-option.ts';
import type { DeviceChoice } from '../runtime/device.ts';
import { cudaLibDirOption, deviceOption, intArg, numberArg, weightsOption, placeForCommand } from './options.ts';
import { resolveWeightFormat, type WeightsFlag } from '../quant/formats.ts';
import { MAX_STEER_ITEMS, steerItemSchema } from '../server/routes/steer-schemas.ts';
import { steerItem, type SteerItem } from '../server/steering.ts';
import type { RequestIntervention } from '../interventions/steer.ts';
import type { ModelConfig } from '../model/config.ts';

interface GenerateFlags {
  model: string;
  intervention?: SteerItem[];
  prompt?: string;
  messages?: string;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed?: number;
  stop?: string[];
  device: DeviceChoice;
  cudaLibDir?: string;
  weights: WeightsFlag;
}

/** `DIR` or `DIR:strength` (a folder whose name ends in `:<number>` needs `DIR:1`). */
function interventionArg(v: string): SteerItem {
  const at = v.lastIndexOf(':');
  const strength = at > 0 ? Number(v.slice(at + 1)) : NaN;
  if (at > 0 && v.slice(at + 1).trim() !== '' && Number.isFinite(strength)) return { intervention: v.slice(0, at), strength };
  return { intervention: v };
}

function layersArg(v: string): number[] {
  const layers = v.split(',').map((l) => Number(l.trim()));
  if (!layers.length || layers.some((l) => !Number.isInteger(l) || l < 0))
    throw new InvalidArgumentError('--layers must be layer numbers separated by commas (e.g. 2,4)');
  return layers;
}

/**
 * `--intervention` may be given several times; `--layers` and `--positions` set the one given
 * last before them, so the options are read in command-line order into one list.
 */
function steerOptions(): { items: SteerItem[]; options: Option[] } {
  const items: SteerItem[] = [];
  const setting =
    <K extends 'layers' | 'positions'>(key: K, parse: (v: string) => SteerItem[K]) =>
    (v: string) => {
      const item = items.at(-1);
      if (!item) throw new InvalidArgumentError(`--${key} sets the --intervention given before it; give that first`);
      if (item[key] !== undefined) throw new InvalidArgumentError(`--${key} is given twice for ${item.intervention}`);
      item[key] = parse(v);
      return items;
    };
  const options = [
    new Option(
      '--intervention <dir[:strength]>',
      'a reft/v1 artifact folder, optionally with a strength in [-10, 10] (default 1); repeat to apply several together',
    ).argParser((v: string) => {
      items.push(interventionArg(v));
      return items;
    }),
    new Option('--layers <list>', "the previous --intervention's layers to keep (comma-separated)").argParser(setting('layers', layersArg)),
    new Option('--positions <spec>', "fN, lN or fN+lN replacing the previous --intervention's positions").argParser(
      setting('positions', (v) => v),
    ),
  ];
  return { items, options };
}

/** The interventions of `--intervention` items, each checked as a request's list item is. */
async function steeredInterventions(items: SteerItem[], config: ModelConfig): Promise<RequestIntervention[]> {
  if (items.length > MAX_STEER_ITEMS)
    throw cliOptionInvalid(
      { option: 'intervention', problem: `is given ${items.length} times; at most ${MAX_STEER_ITEMS}` },
      'intervention',
    );
  const out: RequestIntervention[] = [];
  for (const [i, item] of items.entries()) {
    const { intervention: dir, ...given } = item;
    const settings = steerItemSchema.omit({ intervention: true }).safeParse(given);
    if (!settings.success) {
      const { field, message } = firstIssue(settings.error);
      throw cliOptionInvalid({ option: field, problem: `${message} (for ${dir})` }, field);
    }
    const artifact = await readArtifactDir(dir, config);
    out.push(...steerItem(artifact.interventions, settings.data, i, (key) => `--${key} of ${dir}`));
  }
  return out;
}

export function generateCommand(): Command {
  const steering = steerOptions();
  return new Command('generate')
    .description('generate a continuation and print it (and nothing else) on stdout, ending with a newline')
    .addOption(modelOption())
    .addOption(weightsOption())
    .addOption(steering.options[0])
    .addOption(steering.options[1])
    .addOption(steering.options[2])
    .option('--prompt <text>', 'plain text prompt')
    .option('--messages <json>', 'chat messages as JSON: [{"role":"user","content":"..."}]')
    .option('--max-new-tokens <n>', 'tokens to generate at most', intArg('--max-new-tokens', 1), 128)
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', numberArg('--temperature'), 0)
    .option('--top-p <p>', 'nucleus sampling mass', numberArg('--top-p'), 1)
    .option('--top-k <k>', 'sample among the k most likely tokens (0: all)', intArg('--top-k'), 0)
    .option('--seed <s>', 'random seed (same seed, same output)', intArg('--seed'))
    .addOption(new Option('--stop <text...>', 'stop strings'))
    .addOption(deviceOption())
    .addOption(cudaLibDirOption())
    .action(runGenerate);
}

async function runGenerate(flags: GenerateFlags): Promise<void> {
  const weights = resolveWeightFormat(flags.weights);
  const dir = await modelDir(flags.model);
  const { config, tokenizer } = await loadModel(dir);
  let messages: unknown;
  if (flags.messages !== undefined) {
    try {
      messages = JSON.parse(flags.messages);
    } catch {
      throw cliOptionInvalid({ option: 'messages', problem: 'is not valid JSON' }, 'messages');
    }
  }
  const parsed = generateOptionsSchema.safeParse({
    prompt: flags.prompt,
    messages,
    max_new_tokens: flags.maxNewTokens,
    temperature: flags.temperature,
    top_p: flags.topP,
    top_k: flags.topK,
    seed: flags.seed,
    stop: flags.stop,
  });
  if (!parsed.success) {
    const { field, message } = firstIssue(parsed.error);
    throw cliOptionInvalid({ option: field.replaceAll('_', '-'), problem: message }, field);
  }
  const tokens = tokenize(promptInput(parsed.data), tokenizer);
  const interventions = await steeredInterventions(flags.intervention ?? [], config);
  const request = toGenerationRequest(tokens, parsed.data, interventions, config.maxPositions);
  const { device } = await placeForCommand(flags);
  const engine = await EngineClient.start({ modelDir: dir, cacheDir: cacheDir(), limits: DEFAULT_LIMITS, device, weights });
  try {
    const result = await engine.generate(request, { onToken: (e) => process.stdout.write(e.text) });
    // a line of output, like any command's: shells and pipes expect the newline
    process.stdout.write('\n');
    if (result.finishReason === 'cancelled') process.exitCode = 1;
  } finally {
    await engine.close();
  }
}
