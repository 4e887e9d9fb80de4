import { readFile, realpath, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  weightDtypeUnsupported,
  weightFilesScattered,
  weightIndexInvalid,
  weightsMissing,
  weightTensorDuplicate,
  weightTensorMissing,
  weightTensorShape,
} from '../errors.ts';
import { MODEL_WEIGHTS, layerSpec, type LinearWeights } from './architecture.ts';
import type { ModelConfig } from './config.ts';
import { readHeader, type DType, type TensorInfo } from './safetensors.ts';

/** A tensor of the checkpoint, located in one of its safetensors files. */
export interface WeightRef extends TensorInfo {
  /** Name of the file (inside `Checkpoint.dataDir`) that holds the bytes. */
  file: string;
}

export interface Checkpoint {
  /**
   * The real folder that holds every weight file, after resolving symlinks: ORT reads external
   * data relative to it and refuses paths that leave it (a Hub cache's snapshot links do).
   */
  dataDir: string;
  weights: Map<string, WeightRef>;
  /** Identifies the content: file names, sizes and modification times of the weight files. */
  fingerprint: string;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

async function weightFiles(modelDir: string): Promise<string[]> {
  const indexPath = join(modelDir, 'model.safetensors.index.json');
  if (await exists(indexPath)) {
    let index: { weight_map?: Record<string, string> };
    try {
      index = JSON.parse(await readFile(indexPath, 'utf8'));
    } catch {
      throw weightIndexInvalid({ problem: 'is not valid JSON' }, 'model.safetensors.index.json');
    }
    if (!index.weight_map || typeof index.weight_map !== 'object') {
      throw weightIndexInvalid({ problem: 'has no weight_map' }, 'model.safetensors.index.json');
    }
    const files = [...new Set(Object.values(index.weight_map))];
    for (const f of files) {
      if (typeof f !== 'string' || basename(f) !== f)
        throw weightIndexInvalid({ problem: `names an invalid file ${JSON.stringify(f)}` }, 'model.safetensors.index.json');
    }
    return files.sort();
  }
  if (await exists(join(modelDir, 'model.safetensors'))) return ['model.safetensors'];
  throw weightsMissing({ what: `${modelDir} has neither model.safetensors nor model.safetensors.index.json` }, 'model.safetensors');
}

/** Reads every weight file's header and checks that they live in one real folder. */
export async function openCheckpoint(modelDir: string): Promise<Checkpoint> {
  const files = await weightFiles(modelDir);
  const weights = new Map<string, WeightRef>();
  const dirs = new Set<string>();
  const fingerprint: string[] = [];
  for (const f of files) {
    const path = join(modelDir, f);
    if (!(await exists(path))) throw weightsMissing({ what: `weight file ${f} is missing` }, f);
    const real = await realpath(path);
    dirs.add(dirname(real));
    const header = await readHeader(real);
    const st = await stat(real);
    fingerprint.push(`${basename(real)}:${st.size}:${st.mtimeMs}`);
    for (const info of header.tensors.values()) {
      if (weights.has(info.name)) throw weightTensorDuplicate({ name: info.name }, info.name);
      weights.set(info.name, { ...info, file: basename(real) });
    }
  }
  if (dirs.size !== 1) {
    throw weightFilesScattered({ dir: modelDir, folders: dirs.size }, 'model.safetensors');
  }
  return { dataDir: [...dirs][0], weights, fingerprint: fingerprint.join('|') };
}

export interface ExpectedTensor {
  name: string;
  shape: number[];
}

/** Every tensor the graphs read, with the shape the config implies (names: the layer specs). */
export function expectedTensors(config: ModelConfig): ExpectedTensor[] {
  const { hiddenSize: d, intermediateSize: f, numHeads, numKvHeads, headDim, vocabSize } = config;
  const q = numHeads * headDim;
  const kv = numKvHeads * headDim;
  const out: ExpectedTensor[] = [{ name: MODEL_WEIGHTS.embed, shape: [vocabSize, d] }];
  const linear = (w: LinearWeights, rows: number, cols: number) => {
    out.push({ name: w.weight, shape: [rows, cols] });
    if (w.bias) out.push({ name: w.bias, shape: [rows] });
  };
  const norm = (name: string | null, size: number) => name && out.push({ name, shape: [size] });
  for (let l = 0; l < config.numLayers; l++) {
    const s = layerSpec(config, l);
    norm(s.attnNorm, d);
    linear(s.q, q, d);
    linear(s.k, kv, d);
    linear(s.v, kv, d);
    linear(s.o, d, q);
    norm(s.qNorm, headDim);
    norm(s.kNorm, headDim);
    norm(s.attnOutNorm, d);
    norm(s.mlpNorm, d);
    linear(s.gate, f, d);
    linear(s.up, f, d);
    linear(s.down, d, f);
    norm(s.mlpOutNorm, d);
  }
  out.push({ name: MODEL_WEIGHTS.finalNorm, shape: [d] });
  if (!config.tieWordEmbeddings) out.push({ name: MODEL_WEIGHTS.lmHead, shape: [vocabSize, d] });
  return out;
}

const FLOAT_DTYPES: DType[] = ['F32', 'F16', 'BF16'];

/** Fails with the first missing or mis-shaped tensor; tensors the graph doesn't read are ignored. */
export function validateCheckpoint(config: ModelConfig, checkpoint: Checkpoint): void {
  for (const { name, shape } of expectedTensors(config)) {
    const w = checkpoint.weights.get(name);
    if (!w) throw weightTensorMissing({ name }, name);
    if (w.shape.length !== shape.length || w.shape.some((s, i) => s !== shape[i])) {
      throw weightTensorShape({ name, shape: w.shape, expected: shape }, name);
    }
    if (!FLOAT_DTYPES.includes(w.dtype)) {
      throw weightDtypeUnsupported({ name, dtype: w.dtype }, name);
    }
  }
}
