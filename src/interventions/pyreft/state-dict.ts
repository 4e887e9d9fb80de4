import { pyreftStateDictInvalid } from '../../errors.ts';
import { PyDict, readPickle } from './pickle.ts';
import type { TorchTensor } from './tensor.ts';
import { readTorchZip } from './zip.ts';

/**
 * One `intkey_*.bin`: the `torch.save` of an intervention's `state_dict()`, i.e. an OrderedDict of
 * parameter name → tensor. Read without running pickle (see pickle.ts).
 */
export async function readStateDict(bytes: Uint8Array, file: string, maxElements?: number): Promise<Map<string, TorchTensor>> {
  const zip = await readTorchZip(bytes, file);
  const root = readPickle(zip.records.get('data.pkl') as Uint8Array, { file, record: (name) => zip.records.get(name), maxElements });
  if (!(root instanceof PyDict)) throw pyreftStateDictInvalid({ file, problem: 'data.pkl does not hold a state dict' }, file);
  const tensors = new Map<string, TorchTensor>();
  for (const [key, value] of root.entries) {
    if (typeof key !== 'string') throw pyreftStateDictInvalid({ file, problem: `state dict key ${String(key)} is not a string` }, file);
    if (!isTensor(value)) throw pyreftStateDictInvalid({ file, problem: `state dict entry "${key}" is not a tensor` }, file);
    tensors.set(key, value);
  }
  return tensors;
}

function isTensor(v: unknown): v is TorchTensor {
  return typeof v === 'object' && v !== null && 'values' in v && 'shape' in v;
}
