/**
 * The CUDA probe's child process (src/cuda/load.ts starts it): loads the CUDA libraries the
 * parent found in --cuda-lib-dir, then creates a one-node session on ORT's CUDA provider and
 * runs it. What ORT prints natively (the loader's error naming a missing library) stays on this
 * process's stderr, which the parent reads; the outcome is one JSON line on stdout.
 */
import * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../graph/onnx.ts';
import { preloadLibraries } from './preload.ts';

const libs = JSON.parse(process.argv[2] ?? '[]') as string[];
const say = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

const failed = preloadLibraries(libs);
if (failed) {
  say({ ok: false, message: failed.error, preload: failed.path });
} else {
  const g = new GraphBuilder('cuda_probe');
  g.output(g.op('Relu', [g.input('x', 'float32', [2])]), 'y', 'float32', [2]);
  try {
    const session = await ort.InferenceSession.create(g.encode({ '': 21 }), { executionProviders: ['cuda'] });
    const out = await session.run({ x: new ort.Tensor('float32', Float32Array.from([-1, 2]), [2]) });
    const y = Array.from(out.y.data as Float32Array);
    await session.release();
    say(y[0] === 0 && y[1] === 2 ? { ok: true } : { ok: false, message: `the probe computed [${y.join(', ')}]` });
  } catch (e) {
    say({ ok: false, message: (e as Error).message });
  }
}
