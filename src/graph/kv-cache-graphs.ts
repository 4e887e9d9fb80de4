import { GraphBuilder } from './onnx.ts';

/**
 * The small graphs a device KV cache moves rows with on the device (src/engine/device-kv-store.ts):
 * each takes and gives `n` tensors of the BNSH shape [rows, kv_heads, length, head_dim], every
 * layer's keys, then values.
 */
export interface KvTensorShape {
  numKvHeads: number;
  headDim: number;
}

/** y.i = Concat(Pad(a.i, pad_a), Pad(b.i, pad_b)) along rows: two sets' rows, one length. */
export function joinGraph(shape: KvTensorShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_join');
  const dims = (rows: string, length: string) => [rows, shape.numKvHeads, length, shape.headDim];
  const padA = g.input('pad_a', 'int64', [8]);
  const padB = g.input('pad_b', 'int64', [8]);
  for (let i = 0; i < n; i++) {
    const a = g.op('Pad', [g.input(`a.${i}`, 'float32', dims('rows_a', 'length_a')), padA]);
    const b = g.op('Pad', [g.input(`b.${i}`, 'float32', dims('rows_b', 'length_b')), padB]);
    const y = g.op('Concat', [a, b], { axis: 0 }, { name: `y.${i}` });
    g.output(y, y, 'float32', dims('rows', 'length'));
  }
  return g.encode({ '': 21 });
}

/** y.i = x.i[starts[0]:ends[0], :, starts[1]:ends[1]]: some tokens of some rows (a prefix-cache block). */
export function sliceGraph(shape: KvTensorShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_slice');
  const dims = (rows: string, length: string) => [rows, shape.numKvHeads, length, shape.headDim];
  const starts = g.input('starts', 'int64', [2]);
  const ends = g.input('ends', 'int64', [2]);
  const axes = g.int64s('axes', [0, 2]);
  for (let i = 0; i < n; i++) {
    const y = g.op('Slice', [g.input(`x.${i}`, 'float32', dims('rows', 'length')), starts, ends, axes], {}, { name: `y.${i}` });
    g.output(y, y, 'float32', dims('rows_out', 'length_out'));
  }
  return g.encode({ '': 21 });
}

/** y.i = Concat(a.i, b.i) along the length axis: a row's tokens, then more. */
export function appendGraph(shape: KvTensorShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_append');
  const dims = (length: string) => ['rows', shape.numKvHeads, length, shape.headDim];
  for (let i = 0; i < n; i++) {
    const y = g.op(
      'Concat',
      [g.input(`a.${i}`, 'float32', dims('length_a')), g.input(`b.${i}`, 'float32', dims('length_b'))],
      { axis: 2 },
      { name: `y.${i}` },
    );
    g.output(y, y, 'float32', dims('length'));
  }
  return g.encode({ '': 21 });
}

/** y.i = x.i[rows, :, :length]: picks, orders and trims rows. */
export function selectGraph(shape: KvTensorShape, n: number): Uint8Array {
  const g = new GraphBuilder('kv_select');
  const dims = (rows: string, length: string) => [rows, shape.numKvHeads, length, shape.headDim];
  const rows = g.input('rows', 'int64', ['kept']);
  const length = g.input('length', 'int64', [1]);
  const zero = g.int64s('zero', [0]);
  const axis = g.int64s('length_axis', [2]);
  for (let i = 0; i < n; i++) {
    const picked = g.op('Gather', [g.input(`x.${i}`, 'float32', dims('rows', 'length_in')), rows], { axis: 0 });
    const y = g.op('Slice', [picked, zero, length, axis], {}, { name: `y.${i}` });
    g.output(y, y, 'float32', dims('kept', 'length'));
  }
  return g.encode({ '': 21 });
}
