import onnxProto from 'onnx-proto';

const { onnx } = onnxProto;

/**
 * A one-node model, `y = op(x)` over a float tensor of shape [1]: what a device probe loads to
 * learn whether a provider starts. Encoded here rather than by src/graph/onnx.ts's builder, so
 * that sessions and devices sit below the graphs that are built for them.
 */
export function probeModel(opType: string): Uint8Array {
  const value = (name: string) => ({
    name,
    type: { tensorType: { elemType: onnx.TensorProto.DataType.FLOAT, shape: { dim: [{ dimValue: 1 }] } } },
  });
  const graph = { name: `${opType}_probe`, node: [{ opType, input: ['x'], output: ['y'] }], input: [value('x')], output: [value('y')] };
  return onnx.ModelProto.encode({ irVersion: 10, producerName: 'reft-server', opsetImport: [{ domain: '', version: 21 }], graph }).finish();
}
