import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { expectedTensors, type Checkpoint } from '../model/checkpoint.ts';
import type { ModelConfig } from '../model/config.ts';
import { MODEL_WEIGHTS } from '../model/architecture.ts';
import { readHeader, toFloat32, type SafetensorsFile, type TensorInfo } from '../model/safetensors.ts';
import { blockSizeOf, type QuantScheme } from './blocks.ts';
import { matrixQuantizer, quantizeThreads } from './parallel.ts';

/**
 * A checkpoint quantized once and kept on disk beside the built graphs (the model folder may be
 * read-only), keyed by the checkpoint's fingerprint, the scheme and this builder's version. The
 * file is a safetensors file holding everything the quantized graph reads, so the graph's
 * external data is this one file: per matrix `<name>#q` (U8 [rows, blocks, 32·bits/8]),
 * `<name>#scales` (F32 [rows·blocks]) and `<name>#zeros` (U8, when the scheme stores zero points);
 * the small float tensors (norms, biases) as F32 under their own names, and the embedding too
 * when its rows can't be read as whole blocks (hidden size not a multiple of 32).
 *
 * It is written tensor by tensor (one float tensor in memory at a time), hashed as written, and
 * moved into place whole; on open, a file whose header, size, key or data hash is off is deleted
 * and rebuilt.
 */
export const QUANT_BUILDER_VERSION = 'quant-v2';
const FORMAT = 'reft-quant/v1';

export interface TensorSpan {
  offset: number;
  length: number;
  dims: number[];
}

export interface QuantizedTensor {
  bits: 4 | 8;
  zeroPoints: boolean;
  blockSize: number;
  rows: number;
  cols: number;
  blocks: number;
  data: TensorSpan;
  scales: TensorSpan;
  zeros: TensorSpan | null;
}

export type QuantCacheOutcome = 'hit' | 'built' | 'rebuilt';

export interface QuantizedCheckpoint {
  /** The folder ORT reads the external data from, and the file's name in it (spans: absolute offsets). */
  dir: string;
  file: string;
  key: string;
  /** The scheme's id. */
  scheme: string;
  matrices: Map<string, QuantizedTensor>;
  floats: Map<string, TensorSpan>;
  /** Bytes of weights the graph holds (the file's data section). */
  bytes: number;
  outcome: QuantCacheOutcome;
  /** Why the cached file was rebuilt (outcome 'rebuilt'). */
  rebuildReason?: string;
}

interface PlannedTensor {
  name: string;
  shape: number[];
  /** How the matrix is quantized; null: kept in float. */
  scheme: QuantScheme | null;
}

/** What the quantized graph reads: every matrix quantized, 1-D tensors and an unaligned embedding in float. */
function plan(config: ModelConfig, scheme: QuantScheme): PlannedTensor[] {
  const out: PlannedTensor[] = [];
  for (const t of expectedTensors(config)) {
    if (t.shape.length !== 2) {
      out.push({ ...t, scheme: null });
      continue;
    }
    const table = t.name === MODEL_WEIGHTS.embed || t.name === MODEL_WEIGHTS.lmHead;
    const own = table ? (scheme.vocabulary ?? scheme) : scheme;
    out.push({ ...t, scheme: own });
    if (t.name === MODEL_WEIGHTS.embed && !blockGatherable(t.shape[1], own.bits, blockSizeOf(own))) out.push({ ...t, scheme: null });
  }
  return out;
}

/**
 * Whether GatherBlockQuantized can read the embedding's rows straight from the quantized table:
 * rows of whole blocks (d a multiple of the block size), and for 4 bits whole bytes of packed
 * zero points.
 */
export function blockGatherable(cols: number, bits: 4 | 8, blockSize: number): boolean {
  return cols % blockSize === 0 && (bits === 8 || (cols / blockSize) % 2 === 0);
}

interface HeaderEntry {
  dtype: 'U8' | 'F32';
  shape: number[];
  data_offsets: [number, number];
}

function layout(planned: PlannedTensor[]) {
  const entries: Record<string, HeaderEntry> = {};
  let at = 0;
  const add = (name: string, dtype: 'U8' | 'F32', shape: number[]) => {
    const bytes = shape.reduce((a, b) => a * b, 1) * (dtype === 'F32' ? 4 : 1);
    entries[name] = { dtype, shape, data_offsets: [at, at + bytes] };
    at += bytes;
  };
  for (const t of planned) {
    const { scheme } = t;
    if (!scheme) {
      add(t.name, 'F32', t.shape);
      continue;
    }
    const [rows, cols] = t.shape;
    const size = blockSizeOf(scheme);
    const blocks = Math.ceil(cols / size);
    add(`${t.name}#q`, 'U8', [rows, blocks, (size * scheme.bits) / 8]);
    add(`${t.name}#scales`, 'F32', [rows * blocks]);
    if (scheme.zeroPoints) add(`${t.name}#zeros`, 'U8', [rows * (scheme.bits === 8 ? blocks : Math.ceil(blocks / 2))]);
  }
  return { entries, dataBytes: at };
}

function encodeHeader(entries: Record<string, HeaderEntry>, metadata: Record<string, string>): Uint8Array {
  let json = JSON.stringify({ __metadata__: metadata, ...entries });
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8); // data section 8-byte aligned
  const body = Buffer.from(json, 'utf8');
  const out = new Uint8Array(8 + body.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(body.byteLength), true);
  out.set(body, 8);
  return out;
}

/** The header's metadata; the hash is written last, over a placeholder of its length. */
function metadataFor(key: string, scheme: QuantScheme, dataSha256 = '0'.repeat(64)): Record<string, string> {
  return { format: FORMAT, key, scheme: scheme.id, data_sha256: dataSha256 };
}

export interface QuantizeOptions {
  /** Called once the cache answers, with what it did (tests and the start-up log read it). */
  log?: (message: string) => void;
  /** Worker threads to quantize with (0: this thread); by default every core for a large model. */
  threads?: number;
}

/** The quantized checkpoint for `scheme`, from the cache or built (and cached) now. */
export async function quantizedCheckpoint(
  config: ModelConfig,
  checkpoint: Checkpoint,
  scheme: QuantScheme,
  cacheDir: string,
  opts: QuantizeOptions = {},
): Promise<QuantizedCheckpoint> {
  const planned = plan(config, scheme);
  const key = createHash('sha256')
    .update(
      JSON.stringify({
        version: QUANT_BUILDER_VERSION,
        weights: checkpoint.fingerprint,
        planned: planned.map((t) => [
          t.name,
          t.shape,
          t.scheme && [t.scheme.id, t.scheme.bits, t.scheme.zeroPoints, blockSizeOf(t.scheme)],
        ]),
      }),
    )
    .digest('hex')
    .slice(0, 32);
  const dir = join(cacheDir, 'quantized');
  const file = `${key}.safetensors`;
  const path = join(dir, file);
  const { entries, dataBytes } = layout(planned);
  let outcome: QuantCacheOutcome = 'hit';
  let rebuildReason: string | undefined;
  const problem = await checkCached(path, key, entries, dataBytes);
  if (problem !== null) {
    if (problem !== 'missing') {
      outcome = 'rebuilt';
      rebuildReason = problem;
      await rm(path, { force: true });
    } else outcome = 'built';
    await mkdir(dir, { recursive: true });
    const weights = planned.reduce((n, t) => n + (t.scheme ? t.shape[0] * t.shape[1] : 0), 0);
    await writeQuantized(path, key, planned, entries, checkpoint, scheme, opts.threads ?? quantizeThreads(weights));
  }
  const dataStart = encodeHeader(entries, metadataFor(key, scheme)).byteLength;
  const result = describe(dir, file, key, scheme, planned, entries, dataStart, dataBytes, outcome, rebuildReason);
  opts.log?.(
    outcome === 'hit'
      ? `quantized weights (${scheme.id}) loaded from cache ${path}`
      : outcome === 'built'
        ? `quantized weights (${scheme.id}) built into ${path}`
        : `quantized weights cache ${path} was unusable (${rebuildReason}); rebuilt`,
  );
  return result;
}

/** null when the cached file is whole and current; otherwise why not ('missing' when absent). */
async function checkCached(path: string, key: string, entries: Record<string, HeaderEntry>, dataBytes: number): Promise<string | null> {
  try {
    await stat(path);
  } catch {
    return 'missing';
  }
  let header;
  try {
    header = await readHeader(path);
  } catch (e) {
    return `bad header: ${(e as Error).message}`;
  }
  const { metadata, tensors, dataStart } = header;
  if (metadata.format !== FORMAT || metadata.key !== key) return 'written for another checkpoint or scheme';
  const size = (await stat(path)).size;
  if (size !== dataStart + dataBytes) return `size ${size} bytes, expected ${dataStart + dataBytes}`;
  for (const [name, e] of Object.entries(entries)) {
    const t = tensors.get(name);
    if (!t || t.dtype !== e.dtype || t.offset !== dataStart + e.data_offsets[0] || t.shape.join() !== e.shape.join()) {
      return `tensor ${name} missing or misplaced`;
    }
  }
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { start: dataStart })) hash.update(chunk as Buffer);
  if (hash.digest('hex') !== metadata.data_sha256) return 'data hash mismatch';
  return null;
}

async function writeQuantized(
  path: string,
  key: string,
  planned: PlannedTensor[],
  entries: Record<string, HeaderEntry>,
  checkpoint: Checkpoint,
  scheme: QuantScheme,
  threads: number,
): Promise<void> {
  const metadata = metadataFor(key, scheme);
  const placeholder = encodeHeader(entries, metadata);
  const tmp = `${path}.${process.pid}.${Date.now()}.tmp`;
  const out = await open(tmp, 'w');
  const sources = new Map<string, Awaited<ReturnType<typeof open>>>();
  const quantizer = matrixQuantizer(threads);
  try {
    await out.write(placeholder, 0, placeholder.byteLength, 0);
    let at = placeholder.byteLength;
    const hash = createHash('sha256');
    const put = async (bytes: Uint8Array) => {
      hash.update(bytes);
      await out.write(bytes, 0, bytes.byteLength, at);
      at += bytes.byteLength;
    };
    for (const t of planned) {
      const w = await readTensor(checkpoint, t.name, sources);
      if (!t.scheme) {
        await put(new Uint8Array(w.buffer, w.byteOffset, w.byteLength));
        continue;
      }
      const q = await quantizer.quantize(w, t.shape[0], t.shape[1], t.scheme);
      await put(q.data);
      await put(new Uint8Array(q.scales.buffer, q.scales.byteOffset, q.scales.byteLength));
      if (q.zeros) await put(q.zeros);
    }
    const header = encodeHeader(entries, { ...metadata, data_sha256: hash.digest('hex') });
    await out.write(header, 0, header.byteLength, 0); // same length as the placeholder
    await out.sync();
  } catch (e) {
    await out.close();
    await rm(tmp, { force: true });
    throw e;
  } finally {
    for (const fh of sources.values()) await fh.close();
    await quantizer.close();
  }
  await out.close();
  await rename(tmp, path); // atomic: a concurrent start sees no file or the whole one
}

/** One checkpoint tensor as float32, read on its own (the model is never read whole). */
async function readTensor(
  checkpoint: Checkpoint,
  name: string,
  files: Map<string, Awaited<ReturnType<typeof open>>>,
): Promise<Float32Array> {
  const w = checkpoint.weights.get(name);
  if (!w) throw new Error(`quantizer: checkpoint has no tensor ${name} (validate the checkpoint first)`);
  let fh = files.get(w.file);
  if (!fh) files.set(w.file, (fh = await open(join(checkpoint.dataDir, w.file), 'r')));
  const bytes = new Uint8Array(w.byteLength);
  const { bytesRead } = await fh.read(bytes, 0, w.byteLength, w.offset);
  if (bytesRead !== w.byteLength) throw new Error(`quantizer: ${w.file} ended inside tensor ${name}`);
  const info: TensorInfo = { ...w, offset: 0 };
  return toFloat32({ bytes } as SafetensorsFile, info); // toFloat32 reads only the bytes
}

function describe(
  dir: string,
  file: string,
  key: string,
  scheme: QuantScheme,
  planned: PlannedTensor[],
  entries: Record<string, HeaderEntry>,
  dataStart: number,
  dataBytes: number,
  outcome: QuantCacheOutcome,
  rebuildReason: string | undefined,
): QuantizedCheckpoint {
  const span = (name: string): TensorSpan => {
    const e = entries[name];
    return { offset: dataStart + e.data_offsets[0], length: e.data_offsets[1] - e.data_offsets[0], dims: e.shape };
  };
  const matrices = new Map<string, QuantizedTensor>();
  const floats = new Map<string, TensorSpan>();
  for (const t of planned) {
    if (!t.scheme) {
      floats.set(t.name, span(t.name));
      continue;
    }
    const [rows, cols] = t.shape;
    matrices.set(t.name, {
      bits: t.scheme.bits,
      zeroPoints: t.scheme.zeroPoints,
      blockSize: blockSizeOf(t.scheme),
      rows,
      cols,
      blocks: Math.ceil(cols / blockSizeOf(t.scheme)),
      data: span(`${t.name}#q`),
      scales: span(`${t.name}#scales`),
      zeros: t.scheme.zeroPoints ? span(`${t.name}#zeros`) : null,
    });
  }
  return {
    dir,
    file,
    key,
    scheme: scheme.id,
    matrices,
    floats,
    bytes: dataBytes,
    outcome,
    rebuildReason,
  };
}
