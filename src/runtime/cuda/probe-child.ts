/**
 * The CUDA probe's child process (src/runtime/cuda/load.ts starts it): loads the CUDA libraries the
 * parent found in --cuda-lib-dir, then creates a one-node session on ORT's CUDA provider and
 * runs it. What ORT prints natively (the loader's error naming a missing library) stays on this
 * process's stderr, which the parent reads; the outcome is one JSON line on stdout.
 */
import * as ort from 'onnxruntime-node';
import { probeModel } from '../probe-model.ts';
import { preloadLibraries } from './preload.ts';

const libs = JSON.parse(process.argv[2] ?? '[]') as string[];
const say = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

const failed = preloadLibraries(libs);
if (failed) {
  say({ ok: false, message: failed.error, preload: failed.path });
} else {
  try {
    const session = await ort.InferenceSession.create(probeModel('Relu'), { executionProviders: ['cuda'] });
    const out = await session.run({ x: new ort.Tensor('float32', Float32Array.of(-1), [1]) });
    const [y] = out.y.data as Float32Array;
    await session.release();
    say(y === 0 ? { ok: true } : { ok: false, message: `the probe computed relu(-1) = ${y}` });
  } catch (e) {
    say({ ok: false, message: (e as Error).message });
  }
}
