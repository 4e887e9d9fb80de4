import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, truncateSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import { GREEDY } from '../src/engine/sampler.ts';
import { ReftError } from '../src/errors.ts';
import { parseArtifact } from '../src/interventions/artifact.ts';
import { encodeSafetensors } from '../src/model/safetensors.ts';
import { toGenerationRequest } from '../src/server/protocol.ts';
import { copyOfStories, editConfig, editHeader, loadError } from './support/model-copies.ts';
import { storiesEngine } from './support/engine.ts';
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
    expect(err.message).toContain('missing tensor model.layers.3.mlp.up_proj.weight');
    expect(err.field).toBe('model.layers.3.mlp.up_proj.weight');
  });

  it('a wrong shape', async () => {
    const dir = copyOfStories();
    editHeader(dir, (h) => (h['model.layers.1.self_attn.q_proj.weight'].shape = [32, 128]));
    const err = await loadError(dir);
    expect(err.message).toMatch(/model\.layers\.1\.self_attn\.q_proj\.weight has shape \[32,128\].*\[64,64\]/);
  });

  it('an unsupported architecture', async () => {
    const dir = copyOfStories();
    editConfig(dir, (c) => (c.architectures = ['GPT2LMHeadModel']));
    const err = await loadError(dir);
    expect(err.code).toBe('unsupported_model');
    expect(err.message).toContain('GPT2LMHeadModel');
  });

  it('an unsupported rope scaling type', async () => {
    const dir = copyOfStories();
    editConfig(dir, (c) => (c.rope_scaling = { rope_type: 'yarn', factor: 4 }));
    expect((await loadError(dir)).message).toContain('yarn');
  });

  it('a truncated safetensors file', async () => {
    const dir = copyOfStories();
    const path = join(dir, 'model.safetensors');
    truncateSync(path, statSync(path).size - 1000);
    expect((await loadError(dir)).message).toMatch(/runs past the end of the data/);
    truncateSync(path, 5);
    expect((await loadError(dir)).message).toMatch(/truncated safetensors file/);
  });

  it('a header that lies about its length', async () => {
    const dir = copyOfStories();
    const path = join(dir, 'model.safetensors');
    const bytes = readFileSync(path);
    bytes.writeBigUInt64LE(2n ** 60n, 0);
    writeFileSync(path, bytes);
    expect((await loadError(dir)).message).toMatch(/header length .* exceeds/);
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
  it('worker --device cuda on the CPU-only install says how to get CUDA, in one line of ours', () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'reft-cuda-'));
    const r = spawnSync(process.execPath, [BIN, 'worker', '--device', 'cuda', '--model', STORIES, '--data-dir', dataDir], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([
      'reft-server: this onnxruntime-node install has no CUDA provider: after npm ci run ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js, or run with --device cpu',
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
    expect(() => toGenerationRequest(tokens, opts, [], 512)).toThrow(/600 tokens; the model's context is 512/);
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
    expect(() => scheduler.submit('a', request, { onToken() {}, onDone() {}, onError() {} })).toThrow(ReftError);
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
    expect(() => parseArtifact(config(4, 128), weights, base)).toThrow(/hidden_size is 128, the model's is 64/);
    expect(() => parseArtifact(config(5, 64), weights, base)).toThrow(/interventions\.0\.layer 5 is out of range/);
  });
});
