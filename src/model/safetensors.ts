import { open } from 'node:fs/promises';
import { safetensorsDtypeUnsupported, safetensorsInvalid } from '../errors.ts';

/**
 * The safetensors format: an 8-byte little-endian header length, a JSON header mapping tensor
 * names to {dtype, shape, data_offsets}, then the raw little-endian data. Every header is checked
 * against the bytes actually present before anything trusts an offset.
 */
export type DType = 'F32' | 'F16' | 'BF16' | 'F64' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

export const DTYPE_BYTES: Record<DType, number> = {
  F32: 4,
  F16: 2,
  BF16: 2,
  F64: 8,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
  /** Byte offset where the data section starts (8 + header length). */
  dataStart: number;
}

/** Upper bound on header size: the reference implementation refuses more than 100 MB. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** Bounds a caller may tighten for headers that come from clients (checked before the JSON is parsed). */
export interface HeaderLimits {
  maxHeaderBytes: number;
  maxTensors: number;
}

const CHECKPOINT_HEADER_LIMITS: HeaderLimits = { maxHeaderBytes: MAX_HEADER_BYTES, maxTensors: 1_000_000 };

function fail(source: string, message: string, field?: string): never {
  throw safetensorsInvalid({ source, problem: message }, field ?? source);
}

/**
 * Parses and validates a header given the file's total size. `head` must hold at least the first
 * 8 + headerLength bytes (callers read it in two steps for files on disk).
 */
export function parseHeader(
  head: Uint8Array,
  fileSize: number,
  source: string,
  limits: HeaderLimits = CHECKPOINT_HEADER_LIMITS,
): SafetensorsHeader {
  if (fileSize < 8 || head.byteLength < 8) fail(source, `truncated safetensors file (${fileSize} bytes, no header length)`);
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const headerLen = view.getBigUint64(0, true);
  if (headerLen > BigInt(limits.maxHeaderBytes))
    fail(source, `header length ${headerLen} exceeds the ${limits.maxHeaderBytes}-byte safetensors header limit`);
  const n = Number(headerLen);
  if (8 + n > fileSize) fail(source, `header length ${n} runs past the end of the file (${fileSize} bytes)`);
  if (head.byteLength < 8 + n) throw new Error('parseHeader: caller passed too few bytes');
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(head.subarray(8, 8 + n)));
  } catch {
    fail(source, 'header is not valid UTF-8 JSON');
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) fail(source, 'header is not a JSON object');
  const entries = Object.keys(json).length;
  if (entries > limits.maxTensors + 1)
    fail(source, `header has ${entries} entries, over the safetensors limit of ${limits.maxTensors} tensors`);
  const dataStart = 8 + n;
  const dataSize = fileSize - dataStart;
  const tensors = new Map<string, TensorInfo>();
  let metadata: Record<string, string> = {};
  const spans: Array<[number, number, string]> = [];
  for (const [name, raw] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      metadata = parseMetadata(raw, source);
      continue;
    }
    const info = parseTensorEntry(name, raw, source);
    const [begin, end] = info.offsets;
    if (end > dataSize) fail(source, `tensor "${name}" data [${begin}, ${end}) runs past the end of the data (${dataSize} bytes)`, name);
    const expected = info.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[info.dtype];
    if (end - begin !== expected) {
      fail(source, `tensor "${name}" spans ${end - begin} bytes but ${info.dtype}${JSON.stringify(info.shape)} needs ${expected}`, name);
    }
    tensors.set(name, { name, dtype: info.dtype, shape: info.shape, offset: dataStart + begin, byteLength: expected });
    spans.push([begin, end, name]);
  }
  checkNoOverlap(spans, source);
  return { tensors, metadata, dataStart };
}

function parseMetadata(raw: unknown, source: string): Record<string, string> {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(source, '__metadata__ must be an object of strings');
  for (const [k, v] of Object.entries(raw)) {
    if (typeof v !== 'string') fail(source, `__metadata__.${k} must be a string`);
  }
  return raw as Record<string, string>;
}

function parseTensorEntry(name: string, raw: unknown, source: string) {
  if (typeof raw !== 'object' || raw === null) fail(source, `tensor "${name}" entry is not an object`, name);
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (typeof dtype !== 'string' || !(dtype in DTYPE_BYTES))
    fail(source, `tensor "${name}" has unsupported dtype ${JSON.stringify(dtype)}`, name);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    fail(source, `tensor "${name}" has an invalid shape ${JSON.stringify(shape)}`, name);
  }
  if (
    !Array.isArray(offsets) ||
    offsets.length !== 2 ||
    !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) ||
    offsets[0] > offsets[1]
  ) {
    fail(source, `tensor "${name}" has invalid data_offsets ${JSON.stringify(offsets)}`, name);
  }
  return { dtype: dtype as DType, shape: shape as number[], offsets: offsets as [number, number] };
}

function checkNoOverlap(spans: Array<[number, number, string]>, source: string) {
  spans.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  for (let i = 1; i < spans.length; i++) {
    const [prevBegin, prevEnd, prevName] = spans[i - 1];
    const [begin, , name] = spans[i];
    if (begin < prevEnd && prevEnd > prevBegin) fail(source, `tensors "${prevName}" and "${name}" overlap`, name);
  }
}

/** Reads only the header of a safetensors file on disk. */
export async function readHeader(path: string): Promise<SafetensorsHeader> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    const lenBuf = new Uint8Array(8);
    const { bytesRead } = await fh.read(lenBuf, 0, 8, 0);
    if (bytesRead < 8) fail(path, `truncated safetensors file (${size} bytes, no header length)`);
    const headerLen = new DataView(lenBuf.buffer).getBigUint64(0, true);
    if (headerLen > BigInt(MAX_HEADER_BYTES) || 8n + headerLen > BigInt(size)) {
      return parseHeader(lenBuf, size, path); // throws the precise error
    }
    const head = new Uint8Array(8 + Number(headerLen));
    await fh.read(head, 0, head.byteLength, 0);
    return parseHeader(head, size, path);
  } finally {
    await fh.close();
  }
}

/** A whole safetensors file in memory (interventions: kilobytes). */
export interface SafetensorsFile {
  header: SafetensorsHeader;
  bytes: Uint8Array;
}

export function parseSafetensors(bytes: Uint8Array, source: string, limits?: HeaderLimits): SafetensorsFile {
  return { header: parseHeader(bytes, bytes.byteLength, source, limits), bytes };
}

/** Decodes a floating-point tensor to a fresh Float32Array. */
/** Where converted tensors go: plain memory by default, or e.g. SharedArrayBuffers. */
export type FloatAllocator = (length: number) => Float32Array;

export const plainFloats: FloatAllocator = (length) => new Float32Array(length);

export function toFloat32(file: SafetensorsFile, info: TensorInfo, allocate: FloatAllocator = plainFloats): Float32Array {
  const n = info.byteLength / DTYPE_BYTES[info.dtype];
  const start = file.bytes.byteOffset + info.offset;
  const view = new DataView(file.bytes.buffer, start, info.byteLength);
  switch (info.dtype) {
    case 'F32': {
      // little-endian host (x86, ARM): the bytes are the floats; one copy (aligned or not)
      const out = allocate(n);
      if (start % 4 === 0) out.set(new Float32Array(file.bytes.buffer, start, n));
      else new Uint8Array(out.buffer, out.byteOffset, info.byteLength).set(file.bytes.subarray(info.offset, info.offset + info.byteLength));
      return out;
    }
    case 'F16': {
      const out = allocate(n);
      for (let i = 0; i < n; i++) out[i] = halfToFloat(view.getUint16(i * 2, true));
      return out;
    }
    case 'BF16': {
      const out = allocate(n);
      const u32 = new Uint32Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) u32[i] = view.getUint16(i * 2, true) << 16;
      return out;
    }
    default:
      throw safetensorsDtypeUnsupported({ name: info.name, dtype: info.dtype }, info.name);
  }
}

export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Serializes F32 tensors into a safetensors file (tensors sorted by name, as the reference writer does). */
export function encodeSafetensors(
  tensors: Record<string, { shape: number[]; data: Float32Array }>,
  metadata?: Record<string, string>,
): Uint8Array {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    const bytes = tensors[name].data.byteLength;
    header[name] = { dtype: 'F32', shape: tensors[name].shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8); // align the data section to 8 bytes
  const headerBytes = Buffer.from(json, 'utf8');
  const out = new Uint8Array(8 + headerBytes.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.byteLength), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.byteLength;
  for (const name of names) {
    const d = tensors[name].data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), at);
    at += d.byteLength;
  }
  return out;
}
