import { mkdir, open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Rng } from '../src/rng.ts';
import { expectedTensors } from '../src/model/checkpoint.ts';
import { parseModelConfig } from '../src/model/config.ts';
import { halfToFloat } from '../src/model/safetensors.ts';

/** SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M config.json). */
export const SMOL_135M_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 576,
  intermediate_size: 1536,
  num_hidden_layers: 30,
  num_attention_heads: 9,
  num_key_value_heads: 3,
  head_dim: 64,
  vocab_size: 49152,
  max_position_embeddings: 8192,
  rms_norm_eps: 1e-5,
  rope_theta: 100000,
  hidden_act: 'silu',
  tie_word_embeddings: true,
  bos_token_id: 0,
  eos_token_id: 0,
  torch_dtype: 'float32',
};

/**
 * Llama-3.2-1B's shapes (meta-llama/Llama-3.2-1B config.json) without its llama3 rope scaling,
 * which ../shared/tools/hf_to_gguf.py refuses and which changes constants, not work.
 */
export const LLAMA_1B_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 2048,
  intermediate_size: 8192,
  num_hidden_layers: 16,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 64,
  vocab_size: 128256,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  hidden_act: 'silu',
  tie_word_embeddings: true,
  bos_token_id: 128000,
  eos_token_id: 128001,
  torch_dtype: 'float32',
};

export type WeightDType = 'F32' | 'F16' | 'BF16';

function f32ToF16(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = u & 0x7fffff;
  if (exp <= 0) return sign; // tiny values flush to zero (the generator never makes them)
  if (exp >= 31) return sign | 0x7c00;
  return sign | (exp << 10) | (mant >>> 13);
}

function bf16Value(x: number): number {
  const u = new Uint32Array(new Float32Array([x]).buffer);
  u[0] &= 0xffff0000;
  return new Float32Array(u.buffer)[0];
}

/**
 * Writes a random-weight checkpoint for `rawConfig` (config.json's content) into `dir`, once:
 * norm weights 1, biases small, matrices N(0, 0.02)-like so activations stay realistic. The
 * tokenizer files are copied from `tokenizerFrom` (token ids are all a benchmark needs).
 */
export async function randomCheckpoint(
  dir: string,
  tokenizerFrom: string,
  rawConfig: Record<string, unknown> = SMOL_135M_CONFIG,
  opts: { dtype?: WeightDType; seed?: number; roundTo?: 'F16' | 'BF16' } = {},
): Promise<string> {
  const done = join(dir, '.complete');
  if (
    await stat(done).then(
      () => true,
      () => false,
    )
  )
    return dir;
  const dtype = opts.dtype ?? 'F32';
  const bytesPer = dtype === 'F32' ? 4 : 2;
  await mkdir(dir, { recursive: true });
  const config = parseModelConfig(rawConfig);
  const tensors = expectedTensors(config);
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * bytesPer;
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
  const fh = await open(join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  await fh.write(len);
  await fh.write(Buffer.from(json));
  const rng = new Rng(opts.seed ?? 1234);
  for (const t of tensors) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (t.name.endsWith('norm.weight')) data.fill(1);
    else for (let i = 0; i < n; i++) data[i] = (rng.next() + rng.next() + rng.next() - 1.5) * (t.shape.length === 1 ? 0.02 : 0.04);
    // roundTo writes F32 weights holding exactly the values a half-precision copy would
    if (opts.roundTo) for (let i = 0; i < n; i++) data[i] = opts.roundTo === 'BF16' ? bf16Value(data[i]) : halfToFloat(f32ToF16(data[i]));
    if (dtype === 'F32') await fh.write(new Uint8Array(data.buffer));
    else {
      const half = new Uint16Array(n);
      const u32 = new Uint32Array(data.buffer);
      for (let i = 0; i < n; i++) half[i] = dtype === 'BF16' ? u32[i] >>> 16 : f32ToF16(data[i]);
      await fh.write(new Uint8Array(half.buffer));
    }
  }
  await fh.close();
  await writeFile(
    join(dir, 'config.json'),
    JSON.stringify({ ...rawConfig, torch_dtype: { F32: 'float32', F16: 'float16', BF16: 'bfloat16' }[dtype] }, null, 2),
  );
  await writeFile(
    join(dir, 'generation_config.json'),
    JSON.stringify({ bos_token_id: rawConfig.bos_token_id ?? 1, eos_token_id: rawConfig.eos_token_id ?? 2 }),
  );
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) await writeFile(join(dir, f), await readFile(join(tokenizerFrom, f)));
  await writeFile(done, '');
  return dir;
}
