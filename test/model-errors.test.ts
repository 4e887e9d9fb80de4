import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, truncateSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import { GREEDY } from '../src/sampling/sampler.ts';
import { parseArtifact } from '../src/interventions/artifact.ts';
import { encodeSafetensors } from '../src/model/safetensors.ts';
import { toGenerationRequest } from '../src/server/generation-request.ts';
import { copyOfStories, editConfig, editHeader, loadError } from './support/model-copies.ts';
import { storiesEngine } from './support/engine.ts';
import { thrownBy } from './support/errors.ts';
import { STORIES } from './support/fixtures.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'reft-server.js');

function cliGenerate(dir: string) {
  return spawnSync(process.execPath, [BIN, 'generate', '--model', dir, '--prompt', 'Once upon a time', '--max-new-tokens', '4'], {
    encoding: 'utf8',
    timeout: 60_000,
  });
}

describe('bad checkpoints are refused with an error that names the problem', () => {
  it('a missing tensor', async () => {
    const dir = copyOfStories();
    editHeader(dir, (h) => delete h['model.layers.3.mlp.up_proj.weight']);
    const err = await loadError(dir);
    expect(err).toMatchObject({ code: 'weight_tensor_missing', field: 'model.layers.3.mlp.up_proj.weight' });
  });

  it('a wrong shape', async () => {
    const dir = copyOfStories();
    editHeader(dir, (h) => (h['model.layers.1.self_attn.q_proj.weight'].shape = [32, 128]));
    const err = await loadError(dir);
    expect(err).toMatchObject({ code: 'weight_tensor_shape', field: 'model.layers.1.self_attn.q_proj.weight' });
  });

  it('an unsupported architecture', async () => {
    const dir = copyOfStories();
    editConfig(dir, (c) => (c.architectures = ['GPT2LMHeadModel']));
    const err = await loadError(dir);
    expect(err).toMatchObject({ code: 'architecture_unsupported', category: 'unsupported_model', field: 'architectures' });
  });

  it('an unsupported rope scaling type', async () => {
    const dir = copyOfStories();
    editConfig(dir, (c) => (c.rope_scaling = { rope_type: 'yarn', factor: 4 }));
    expect(await loadError(dir)).toMatchObject({ code: 'rope_scaling_unsupported', field: 'rope_scaling.rope_type' });
  });

  it('a truncated safetensors file', async () => {
    const dir = copyOfStories();
    const path = join(dir, 'model.safetensors');
    truncateSync(path, statSync(path).size - 1000);
    expect((await loadError(dir)).code).toBe('safetensors_invalid');
    truncateSync(path, 5);
    expect((await loadError(dir)).code).toBe('safetensors_invalid');
  });

  it('a header that lies about its length', async () => {
    const dir = copyOfStories();
    const path = join(dir, 'model.safetensors');
    const bytes = readFileSync(path);
    bytes.writeBigUInt64LE(2n ** 60n, 0);
    writeFileSync(path, bytes);
    expect((await loadError(dir)).code).toBe('safetensors_invalid');
  });

  it('the CLI reports such a model in one line and exits 1 without a stack trace', () => {
    const dir = copyOfStories();
    editHeader(dir, (h) => delete h['model.norm.weight']);
    const r = cliGenerate(dir);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toEqual(['reft-server: checkpoint is missing tensor model.norm.weight']);
  });
});

describe('a device this install cannot drive', () => {
  it('worker --device cuda without the CUDA provider says how to install it, in one line of ours', () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'reft-cuda-'));
    const r = spawnSync(process.execPath, [BIN, 'worker', '--device', 'cuda', '--model', STORIES, '--data-dir', dataDir], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([
      "reft-server: ORT's CUDA provider is not installed: run npm run setup:cuda, or run with --device cpu",
    ]);
  });
});

describe('bad requests are refused before they reach the engine', () => {
  it('a prompt longer than the context', async () => {
    const { engine } = await storiesEngine();
    const tokens = Array.from({ length: 600 }, (_, i) => 3 + (i % 100));
    const opts = {
      max_new_tokens: 4,
      temperature: 0,
      top_p: 1,
      top_k: 0,
      ignore_eos: false,
      repetition_penalty: 1,
      logprobs: false,
      top_logprobs: 0,
    };
    expect(thrownBy(() => toGenerationRequest(tokens, opts, [], 512))).toMatchObject({ code: 'prompt_too_long', field: 'prompt' });
    const scheduler = new Scheduler(
      engine,
      { createStreamDecoder: () => ({ push: () => '', flush: () => '' }) },
      new Set([2]),
      DEFAULT_LIMITS,
    );
    const request = {
      tokens,
      interventions: [],
      sampling: GREEDY,
      maxNewTokens: 4,
      stop: [],
      ignoreEos: false,
      logprobs: false,
      topLogprobs: 0,
    };
    expect(thrownBy(() => scheduler.submit('a', request, { onToken() {}, onDone() {}, onError() {} })).code).toBe('prompt_too_long');
    await engine.close();
  });

  it('an intervention whose hidden size or layer does not fit the model', () => {
    const base = { hiddenSize: 64, numLayers: 5 };
    const rotate = new Float32Array(2 * 64);
    rotate[0] = 1;
    rotate[64 + 1] = 1;
    const weights = encodeSafetensors({
      'interventions.0.rotate': { shape: [2, 64], data: rotate },
      'interventions.0.source.weight': { shape: [2, 64], data: new Float32Array(128) },
      'interventions.0.source.bias': { shape: [2], data: new Float32Array(2) },
    });
    const config = (layer: number, hidden: number) =>
      JSON.stringify({
        format: 'reft/v1',
        base_model: { hidden_size: hidden, num_hidden_layers: 5 },
        interventions: [{ kind: 'loreft', layer, rank: 2, positions: 'l1' }],
      });
    expect(parseArtifact(config(4, 64), weights, base).interventions).toHaveLength(1);
    expect(thrownBy(() => parseArtifact(config(4, 128), weights, base))).toMatchObject({
      code: 'artifact_model_mismatch',
      field: 'reft_config.json.base_model.hidden_size',
    });
    expect(thrownBy(() => parseArtifact(config(5, 64), weights, base))).toMatchObject({
      code: 'intervention_layer_out_of_range',
      field: 'reft_config.json.interventions.0.layer',
    });
  });
});
