import { describe, expect, it } from 'vitest';
import { encodeSafetensors, parseSafetensors, toFloat32 } from '../src/model/safetensors.ts';

describe('safetensors F32 tensors', () => {
  const values = Float32Array.from({ length: 37 }, (_, i) => (i - 18) / 7);
  const encoded = encodeSafetensors({ w: { shape: [37], data: values } });

  it('read wherever the file sits in memory: aligned, or at an odd byte offset', () => {
    for (const shift of [0, 1, 2, 3]) {
      const backing = new Uint8Array(encoded.length + shift);
      backing.set(encoded, shift);
      const file = parseSafetensors(backing.subarray(shift), 'w.safetensors');
      const out = toFloat32(file, file.header.tensors.get('w')!);
      expect(Array.from(out), `shift ${shift}`).toEqual(Array.from(values));
    }
  });

  it('land in the memory the caller allocates', () => {
    const file = parseSafetensors(encoded, 'w.safetensors');
    const out = toFloat32(file, file.header.tensors.get('w')!, (n) => new Float32Array(new SharedArrayBuffer(4 * n)));
    expect(out.buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(Array.from(out)).toEqual(Array.from(values));
  });
});
