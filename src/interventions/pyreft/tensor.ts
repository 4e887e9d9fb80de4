import { pyreftTensorInvalid } from '../../errors.ts';
import { DTYPE_BYTES, toFloat32, type TensorInfo } from '../../model/safetensors.ts';

/**
 * Torch tensors as `torch.save` stores them: a typed storage (one `data/<key>` record of
 * little-endian elements) and a view over it given by an offset, sizes and strides, all in
 * elements. Values are decoded to float64, which holds every F32, BF16, F16 value exactly and
 * every I64 this importer accepts (safe integers).
 */
export type TorchDType = 'F32' | 'BF16' | 'F16' | 'I64';

/** The storage classes the pickle may name (`torch FloatStorage`, ...) and what they hold. */
export const STORAGE_DTYPES: Readonly<Record<string, TorchDType>> = {
  FloatStorage: 'F32',
  BFloat16Storage: 'BF16',
  HalfStorage: 'F16',
  LongStorage: 'I64',
};

export interface TorchStorage {
  dtype: TorchDType;
  key: string;
  numel: number;
  bytes: Uint8Array;
}

export interface TorchTensor {
  dtype: TorchDType;
  shape: number[];
  /** Row-major (contiguous) values. */
  values: Float64Array;
}

/** Ties a persistent id to its `data/<key>` record; the record must hold exactly `numel` elements. */
export function makeStorage(dtype: TorchDType, key: string, numel: number, record: Uint8Array | undefined, file: string): TorchStorage {
  if (record === undefined) throw invalid(file, `storage "${key}" has no record data/${key}`);
  const need = numel * DTYPE_BYTES[dtype];
  if (record.byteLength < need) {
    throw invalid(file, `storage "${key}" is shorter than declared: data/${key} holds ${record.byteLength} bytes, ${numel} × ${dtype} need ${need}`);
  }
  if (record.byteLength !== need) {
    throw invalid(file, `storage "${key}" does not match its record: data/${key} holds ${record.byteLength} bytes, ${numel} × ${dtype} need ${need}`);
  }
  return { dtype, key, numel, bytes: record };
}

/** `_rebuild_tensor_v2(storage, offset, size, stride, ...)`: copies the view out of the storage. */
export function rebuildTensor(storage: TorchStorage, offset: number, shape: number[], stride: number[], file: string): TorchTensor {
  if (shape.length !== stride.length) throw invalid(file, `tensor over storage "${storage.key}" has ${shape.length} sizes but ${stride.length} strides`);
  const count = shape.reduce((a, b) => a * b, 1);
  const last = count === 0 ? offset : offset + shape.reduce((sum, n, k) => sum + (n - 1) * stride[k], 0);
  if (count > 0 && last >= storage.numel) {
    throw invalid(file, `storage "${storage.key}" (${storage.numel} elements) is shorter than the tensor it backs (offset ${offset}, size [${shape}], stride [${stride}] reach element ${last})`);
  }
  // stride 0 lets a tiny storage fake a huge view; a state dict never holds one
  if (count > storage.numel) throw invalid(file, `tensor over storage "${storage.key}" has ${count} elements, more than its storage holds (${storage.numel}): a view may not be larger than its storage`);
  const read = elementReader(storage, file);
  const values = new Float64Array(count);
  const index = new Array<number>(shape.length).fill(0);
  for (let i = 0; i < count; i++) {
    values[i] = read(offset + index.reduce((sum, v, k) => sum + v * stride[k], 0));
    increment(index, shape);
  }
  return { dtype: storage.dtype, shape, values };
}

/** Advances a row-major multi-index by one. */
function increment(index: number[], shape: number[]): void {
  for (let k = shape.length - 1; k >= 0; k--) {
    if (++index[k] < shape[k]) return;
    index[k] = 0;
  }
}

function elementReader(storage: TorchStorage, file: string): (i: number) => number {
  const { key, dtype, numel, bytes } = storage;
  if (dtype !== 'I64') {
    // F32, BF16 and F16 storages are laid out as safetensors lays out a tensor: decode it as one.
    const info: TensorInfo = { name: key, dtype, shape: [numel], offset: 0, byteLength: bytes.byteLength };
    const floats = toFloat32({ header: { tensors: new Map([[key, info]]), metadata: {}, dataStart: 0 }, bytes }, info);
    return (i) => floats[i];
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return (i) => {
    const v = view.getBigInt64(i * 8, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw invalid(file, `storage "${key}" holds an int64 (${v}) beyond the safe integer range`);
    }
    return Number(v);
  };
}

function invalid(file: string, message: string) {
  return pyreftTensorInvalid({ file, problem: message }, file);
}
