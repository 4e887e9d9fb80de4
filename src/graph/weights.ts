import type { Checkpoint } from '../model/checkpoint.ts';
import type { GraphBuilder, ElemType } from './onnx.ts';

const WEIGHT_ELEM: Record<string, ElemType> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };

/**
 * A checkpoint tensor as an initializer over the safetensors file's own bytes (external data,
 * no copy). Half-precision weights are cast to float32, a cast ORT folds when the session loads.
 */
export function checkpointWeight(g: GraphBuilder, checkpoint: Checkpoint, name: string): string {
  const w = checkpoint.weights.get(name);
  if (!w) throw new Error(`graph builder: checkpoint has no tensor ${name} (validate the checkpoint first)`);
  const ref = g.external({ name, elemType: WEIGHT_ELEM[w.dtype], dims: w.shape, location: w.file, offset: w.offset, length: w.byteLength });
  return w.dtype === 'F32' ? ref : g.op('Cast', [ref], { to: 1 });
}

/** checkpointWeight, each tensor declared once however often the graph reads it. */
export function checkpointWeights(g: GraphBuilder, checkpoint: Checkpoint): (name: string) => string {
  const made = new Map<string, string>();
  return (name) => {
    let w = made.get(name);
    if (w === undefined) made.set(name, (w = checkpointWeight(g, checkpoint, name)));
    return w;
  };
}

/** offset + w for a norm's weight (Gemma stores w − 1); ORT folds the Add when the session loads. */
export function offsetWeight(g: GraphBuilder, w: string, offset: number): string {
  return offset === 0 ? w : g.op('Add', [w, g.constant('norm_offset', Float32Array.of(offset), [])]);
}
