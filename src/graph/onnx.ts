import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';

// onnx-proto is CommonJS without named exports: take the namespace off the default export.
const { onnx } = onnxProto as unknown as { onnx: typeof OnnxTypes };
type TensorProto = OnnxTypes.ITensorProto;
type NodeProto = OnnxTypes.INodeProto;
type ValueInfoProto = OnnxTypes.IValueInfoProto;
type AttributeProto = OnnxTypes.IAttributeProto;

/**
 * A small ONNX graph builder: values are names, `op` appends a node and returns its outputs'
 * names, and `encode` serialises the model. Weights are referenced as external data so that
 * ORT reads them straight from the checkpoint's files.
 */
export type ElemType = 'float32' | 'float16' | 'bfloat16' | 'int64' | 'int32' | 'uint8' | 'bool';
export type Dim = number | string;

export const ELEM: Record<ElemType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  float16: onnx.TensorProto.DataType.FLOAT16,
  bfloat16: onnx.TensorProto.DataType.BFLOAT16,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  uint8: onnx.TensorProto.DataType.UINT8,
  bool: onnx.TensorProto.DataType.BOOL,
};

/** Attribute values: integers, floats (tag with `float()` when integral), lists and strings. */
export type AttrValue = number | string | number[] | FloatAttr | FloatsAttr | TensorAttr | GraphAttr;
interface FloatAttr {
  kind: 'float';
  value: number;
}
interface FloatsAttr {
  kind: 'floats';
  value: number[];
}
interface TensorAttr {
  kind: 'tensor';
  value: TensorProto;
}
interface GraphAttr {
  kind: 'graph';
  value: GraphBuilder;
}
export const float = (value: number): FloatAttr => ({ kind: 'float', value });
export const floats = (value: number[]): FloatsAttr => ({ kind: 'floats', value });
/** A subgraph attribute (If / Loop bodies); it may read values of the enclosing graph by name. */
export const subgraph = (value: GraphBuilder): GraphAttr => ({ kind: 'graph', value });

export const MS_DOMAIN = 'com.microsoft';

export interface ExternalTensor {
  name: string;
  elemType: ElemType;
  dims: number[];
  /** File name relative to the external-data folder. */
  location: string;
  offset: number;
  length: number;
}

export class GraphBuilder {
  private readonly nodes: NodeProto[] = [];
  private readonly inputs: ValueInfoProto[] = [];
  private readonly outputs: ValueInfoProto[] = [];
  private readonly initializers: TensorProto[] = [];
  private readonly names = new Set<string>();
  private counter = 0;

  /** `prefix` keeps generated names apart from the enclosing graph's (for If / Loop bodies). */
  constructor(
    readonly name: string,
    private readonly prefix = '',
  ) {}

  private fresh(hint: string): string {
    let n = `${this.prefix}${hint}_${this.counter++}`;
    while (this.names.has(n)) n = `${this.prefix}${hint}_${this.counter++}`;
    this.names.add(n);
    return n;
  }

  private claim(name: string): string {
    if (this.names.has(name)) throw new Error(`graph value ${name} defined twice`);
    this.names.add(name);
    return name;
  }

  input(name: string, elemType: ElemType, dims: Dim[]): string {
    this.inputs.push(valueInfo(this.claim(name), elemType, dims));
    return name;
  }

  /** Marks `value` as a graph output under `name` (an Identity renames it when they differ). */
  output(value: string, name: string, elemType: ElemType, dims: Dim[]): string {
    const out = value === name ? value : this.op('Identity', [value], {}, { name });
    this.outputs.push(valueInfo(out, elemType, dims));
    return out;
  }

  external(t: ExternalTensor): string {
    this.initializers.push({
      name: this.claim(t.name),
      dataType: ELEM[t.elemType],
      dims: t.dims,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: t.location },
        { key: 'offset', value: String(t.offset) },
        { key: 'length', value: String(t.length) },
      ],
    });
    return t.name;
  }

  /** An initializer stored inside the model (small constants, rotary tables). */
  constant(hint: string, data: Float32Array | BigInt64Array | Int32Array, dims: number[]): string {
    const name = this.fresh(hint);
    const elemType: ElemType = data instanceof Float32Array ? 'float32' : data instanceof Int32Array ? 'int32' : 'int64';
    this.initializers.push({
      name,
      dataType: ELEM[elemType],
      dims,
      rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    });
    return name;
  }

  /** A uint8 scalar (bit masks and shifts). */
  constantU8(hint: string, value: number): string {
    const name = this.fresh(hint);
    this.initializers.push({ name, dataType: ELEM.uint8, dims: [], rawData: Uint8Array.of(value) });
    return name;
  }

  int64s(hint: string, values: number[]): string {
    return this.constant(hint, BigInt64Array.from(values.map(BigInt)), [values.length]);
  }

  /** Appends a node with one output and returns the output's name. */
  op(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, opts: { domain?: string; name?: string } = {}): string {
    return this.opN(opType, inputs, 1, attrs, opts)[0];
  }

  /** Appends a node with `n` outputs; pass '' in `inputs` to skip an optional input. */
  opN(
    opType: string,
    inputs: string[],
    n: number,
    attrs: Record<string, AttrValue> = {},
    opts: { domain?: string; name?: string; outputs?: string[] } = {},
  ): string[] {
    const outputs =
      opts.outputs?.map((o) => this.claim(o)) ??
      Array.from({ length: n }, (_, i) => (i === 0 && opts.name ? this.claim(opts.name) : this.fresh(opType)));
    this.nodes.push({
      opType,
      domain: opts.domain ?? '',
      name: this.fresh(`node_${opType}`),
      input: inputs,
      output: outputs,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    return outputs;
  }

  graphProto() {
    return { name: this.name, node: this.nodes, input: this.inputs, output: this.outputs, initializer: this.initializers };
  }

  encode(opsets: Record<string, number>): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: 10,
      producerName: 'reft-server',
      opsetImport: Object.entries(opsets).map(([domain, version]) => ({ domain, version })),
      graph: this.graphProto(),
    });
    return onnx.ModelProto.encode(model).finish();
  }
}

function valueInfo(name: string, elemType: ElemType, dims: Dim[]): ValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ELEM[elemType],
        shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

function attribute(name: string, v: AttrValue): AttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof v === 'number') {
    return Number.isInteger(v) ? { name, type: T.INT, i: v } : { name, type: T.FLOAT, f: v };
  }
  if (typeof v === 'string') return { name, type: T.STRING, s: new TextEncoder().encode(v) };
  if (Array.isArray(v)) return { name, type: T.INTS, ints: v };
  if (v.kind === 'float') return { name, type: T.FLOAT, f: v.value };
  if (v.kind === 'floats') return { name, type: T.FLOATS, floats: v.value };
  if (v.kind === 'graph') return { name, type: T.GRAPH, g: v.value.graphProto() };
  return { name, type: T.TENSOR, t: v.value };
}
