import type { ModelConfig } from '../model/config.ts';
import { GraphBuilder } from './onnx.ts';

/**
 * The small graphs a device KV cache moves rows with on the device (src/engine/device-kv-store.ts):
 * each takes and gives `n` tensors of the BNSH shape [rows, kv_heads, length, head_dim], every
 * layer's keys, then values.
 */
type KvShape = Pick<ModelConfig, 'numKvHeads' | 'headDim'>;
type Dims = (rows: string, length: string) => Array<string | number>;

/**
 * A graph over `n` tensors: `setup` declares the shared inputs and returns how output `y` is made
 * from tensor i; the outputs have the symbolic rows and length `out`.
 */
function kvGraph(
  name: string,
  shape: KvShape,
  n: number,
  out: [string, string],
  setup: (g: GraphBuilder, dims: Dims) => (i: number, y: string) => string,
): Uint8Array {
  const g = new GraphBuilder(name);
  const dims: Dims = (rows, length) => [rows, shape.numKvHeads, length, shape.headDim];
  const each = setup(g, dims);
  for (let i = 0; i < n; i++) {
    const y = each(i, `y.${i}`);
    g.output(y, y, 'float32', dims(...out));
  }
  return g.encode({ '': 21 });
}

/** y.i = Concat(Pad(a.i, pad_a), Pad(b.i, pad_b)) along rows: two sets' rows, one length. */
export function joinGraph(shape: KvShape, n: number): Uint8Array {
  return kvGraph('kv_join', shape, n, ['rows', 'length'], (g, dims) => {
    const padA = g.input('pad_a', 'int64', [8]);
    const padB = g.input('pad_b', 'int64', [8]);
    return (i, y) => {
      const a = g.op('Pad', [g.input(`a.${i}`, 'float32', dims('rows_a', 'length_a')), padA]);
      const b = g.op('Pad', [g.input(`b.${i}`, 'float32', dims('rows_b', 'length_b')), padB]);
      return g.op('Concat', [a, b], { axis: 0 }, { name: y });
    };
  });
}

/** y.i = x.i[starts[0]:ends[0], :, starts[1]:ends[1]]: some tokens of some rows (a prefix-cache block). */
export function sliceGraph(shape: KvShape, n: number): Uint8Array {
  return kvGraph('kv_slice', shape, n, ['rows_out', 'length_out'], (g, dims) => {
    const starts = g.input('starts', 'int64', [2]);
    const ends = g.input('ends', 'int64', [2]);
    const axes = g.int64s('axes', [0, 2]);
    return (i, y) => g.op('Slice', [g.input(`x.${i}`, 'float32', dims('rows', 'length')), starts, ends, axes], {}, { name: y });
  });
}

/** y.i = Concat(a.i, b.i) along the length axis: a row's tokens, then more. */
export function appendGraph(shape: KvShape, n: number): Uint8Array {
  return kvGraph('kv_append', shape, n, ['rows', 'length'], (g, dims) => (i, y) => {
    const a = g.input(`a.${i}`, 'float32', dims('rows', 'length_a'));
    const b = g.input(`b.${i}`, 'float32', dims('rows', 'length_b'));
    return g.op('Concat', [a, b], { axis: 2 }, { name: y });
  });
}

/** y.i = x.i[rows, :, :length]: picks, orders and trims rows. */
export function selectGraph(shape: KvShape, n: number): Uint8Array {
  return kvGraph('kv_select', shape, n, ['kept', 'length'], (g, dims) => {
    const rows = g.input('rows', 'int64', ['kept']);
    const length = g.input('length', 'int64', [1]);
    const zero = g.int64s('zero', [0]);
    const axis = g.int64s('length_axis', [2]);
    return (i, y) => {
      const picked = g.op('Gather', [g.input(`x.${i}`, 'float32', dims('rows', 'length_in')), rows], { axis: 0 });
      return g.op('Slice', [picked, zero, length, axis], {}, { name: y });
    };
  });
}
