import type * as ort from 'onnxruntime-node';
import { deviceOutOfMemory } from '../errors.ts';

/** Bytes a run handed to the device and took back (host ↔ device traffic through ORT). */
export interface RunTransfer {
  uploaded: number;
  downloaded: number;
  /** Where the run's past key/value feeds were ('gpu-buffer': on the device). */
  pastLocations: Array<ort.Tensor['location']>;
}

/** What a run's feeds and outputs moved between the host and the device: every tensor in host memory crossed. */
export function runTransfer(feeds: Record<string, ort.Tensor>, out: Record<string, ort.Tensor>): RunTransfer {
  const bytes = (ts: Iterable<ort.Tensor>) => {
    let n = 0;
    for (const t of ts) if (t.location === 'cpu') n += (t.data as ArrayBufferView).byteLength;
    return n;
  };
  const pastLocations = [
    ...new Set(
      Object.entries(feeds)
        .filter(([name]) => name.startsWith('past_'))
        .map(([, t]) => t.location),
    ),
  ];
  return { uploaded: bytes(Object.values(feeds)), downloaded: bytes(Object.values(out)), pastLocations };
}

/** ORT's allocation failures on the device, as an error that says what ran out. */
export function deviceError(err: unknown): unknown {
  const message = (err as Error)?.message ?? String(err);
  if (/out of memory|failed to allocate|allocation failed|OOM/i.test(message)) {
    return deviceOutOfMemory({ detail: message }, undefined, { retryAfterSeconds: 1 });
  }
  return err;
}
