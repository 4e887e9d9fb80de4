import { existsSync } from 'node:fs';
import { mkdir, open, rename } from 'node:fs/promises';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { GraphBuilder, MS_DOMAIN } from '../src/graph/onnx.ts';

/** A measurement that reports bytes read per second for one run. */
export interface Probe {
  once(): Promise<number>;
  release(): Promise<void>;
}

/** Varied values: a buffer of one repeated value read anywhere from 22 to 45 GB/s within a minute on this VM. */
function fillVaried(data: Float32Array, seed = 0): void {
  for (let i = 0; i < data.length; i++) data[i] = ((Math.imul(i + seed, 2654435761) >>> 0) % 1000) / 1000 - 0.5;
}

async function timed(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, bytes: number): Promise<number> {
  const t = performance.now();
  await session.run(feeds);
  return bytes / ((performance.now() - t) / 1000);
}

/**
 * ORT's read bandwidth with `threads` threads: a row-sum over 512 MiB, far beyond the caches.
 */
export async function bandwidthProbe(threads: number): Promise<Probe> {
  const rows = 4096;
  const cols = 32768;
  const g = new GraphBuilder('bandwidth');
  const x = g.input('x', 'float32', [rows, cols]);
  g.output(g.op('ReduceSum', [x, g.int64s('axes', [1])], { keepdims: 0 }), 'y', 'float32', [rows]);
  const session = await ort.InferenceSession.create(g.encode({ '': 21 }), {
    intraOpNumThreads: threads,
    // no spinning: idle probe threads must not steal cycles from the decode measured next
    extra: { session: { intra_op: { allow_spinning: '0' } } },
  } as ort.InferenceSession.SessionOptions);
  const data = new Float32Array(rows * cols);
  fillVaried(data);
  const feeds = { x: new ort.Tensor('float32', data, [rows, cols]) };
  for (let i = 0; i < 3; i++) await session.run(feeds);
  return { once: () => timed(session, feeds, data.byteLength), release: () => session.release() };
}

/**
 * ORT's best case for a decode step's matrix-vector products: one FusedMatMul of a [1, k] row
 * against a single prepacked [n, k] weight of `bytes` bytes (the decoder's kernel, with none of
 * a layer's boundaries). The weight is a file under `dir`, written once.
 */
export async function gemvProbe(bytes: number, k: number, threads: number, dir: string): Promise<Probe> {
  const n = Math.round(bytes / (4 * k));
  const file = `gemv-${n}x${k}.bin`;
  await mkdir(dir, { recursive: true });
  if (!existsSync(join(dir, file))) await writeVariedFile(join(dir, file), n, k);
  const g = new GraphBuilder('gemv');
  const x = g.input('x', 'float32', [1, k]);
  const w = g.external({ name: 'w', elemType: 'float32', dims: [n, k], location: file, offset: 0, length: n * k * 4 });
  const y = g.op('FusedMatMul', [x, w], { transB: 1 }, { domain: MS_DOMAIN });
  g.output(g.op('ReduceMax', [y], { keepdims: 0 }), 'y', 'float32', []);
  const session = await ort.InferenceSession.create(g.encode({ '': 21, [MS_DOMAIN]: 1 }), {
    intraOpNumThreads: threads,
    extra: { session: { model_external_initializers_file_folder_path: dir, intra_op: { allow_spinning: '0' } } },
  } as ort.InferenceSession.SessionOptions);
  const feeds = { x: new ort.Tensor('float32', new Float32Array(k).fill(0.01), [1, k]) };
  for (let i = 0; i < 3; i++) await session.run(feeds);
  return { once: () => timed(session, feeds, n * k * 4), release: () => session.release() };
}

async function writeVariedFile(path: string, rows: number, cols: number): Promise<void> {
  const partial = `${path}.partial`;
  const out = await open(partial, 'w');
  const row = new Float32Array(cols);
  const block = new Float32Array(cols * 1024);
  for (let r = 0; r < rows; r += 1024) {
    const count = Math.min(1024, rows - r);
    for (let i = 0; i < count; i++) {
      fillVaried(row, (r + i) * cols);
      block.set(row, i * cols);
    }
    await out.write(new Uint8Array(block.buffer, 0, count * cols * 4));
  }
  await out.close();
  await rename(partial, path);
}
