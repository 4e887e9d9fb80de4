import { Command, Option } from 'commander';
import { EngineClient } from '../engine/engine-client.ts';
import { generateOptionsSchema, promptInput, toGenerationRequest, tokenize } from '../server/protocol.ts';
import { DEFAULT_LIMITS } from '../engine/scheduler.ts';
import { cliOptionInvalid, firstIssue } from '../errors.ts';
import { readArtifactDir } from '../interventions/directory.ts';
import { loadModel } from '../model/load.ts';
import { cacheDir } from '../settings.ts';
import { modelDir, modelOption } from './model-option.ts';
import { resolveDevice, type DeviceChoice } from '../engine/device.ts';
import { deviceOption, intArg, numberArg, weightsOption } from './options.ts';
import { resolveWeightFormat, type WeightsFlag } from '../quant/formats.ts';

interface GenerateFlags {
  model: string;
  intervention?: string;
  prompt?: string;
  messages?: string;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed?: number;
  stop?: string[];
  device: DeviceChoice;
  weights: WeightsFlag;
}

export function generateCommand(): Command {
  return new Command('generate')
    .description('generate a continuation and print it (and nothing else) on stdout, ending with a newline')
    .addOption(modelOption())
    .addOption(weightsOption())
    .option('--intervention <dir>', 'a reft/v1 artifact folder (reft_config.json + reft_weights.safetensors)')
    .option('--prompt <text>', 'plain text prompt')
    .option('--messages <json>', 'chat messages as JSON: [{"role":"user","content":"..."}]')
    .option('--max-new-tokens <n>', 'tokens to generate at most', intArg('--max-new-tokens', 1), 128)
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', numberArg('--temperature'), 0)
    .option('--top-p <p>', 'nucleus sampling mass', numberArg('--top-p'), 1)
    .option('--top-k <k>', 'sample among the k most likely tokens (0: all)', intArg('--top-k'), 0)
    .option('--seed <s>', 'random seed (same seed, same output)', intArg('--seed'))
    .addOption(new Option('--stop <text...>', 'stop strings'))
    .addOption(deviceOption())
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
  const interventions = flags.intervention ? (await readArtifactDir(flags.intervention, config)).interventions : [];
  const request = toGenerationRequest(tokens, parsed.data, interventions, config.maxPositions);
  const { device } = await resolveDevice(flags.device);
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
