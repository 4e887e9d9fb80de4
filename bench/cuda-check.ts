/**
 * The reference cases on a GPU (issue 24's check for a machine with one; no GPU here, so not a
 * test file): stories260k's cases decoded on `--device` (default cuda) against the CPU engine
 * and the PyTorch reference, as test/webgpu-engine.test.ts does for WebGPU, plus where ORT put
 * the decoder's nodes. Prints one line per check and, last, a JSON summary; exits 1 if any
 * check failed.
 *
 *   node --import tsx bench/cuda-check.ts [cuda|webgpu|cpu]   (REFT_CUDA_LIB_DIR: --cuda-lib-dir)
 */
import * as ort from 'onnxruntime-node';
import { parseLibDirs } from '../src/runtime/cuda/load.ts';
import { resolveDevice, type DeviceChoice } from '../src/runtime/device.ts';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { PrefillInput } from '../src/engine/step-plan.ts';
import { argmax } from '../src/sampling/sampler.ts';
import { buildDecoderGraph } from '../src/graph/decoder.ts';
import { GraphBuilder } from '../src/graph/onnx.ts';
import { loadModel } from '../src/model/load.ts';
import { greedyBatch, maxAbsDiff, testCacheDir } from '../test/support/engine.ts';
import { STORIES, inferenceCases } from '../test/support/fixtures.ts';
import { nodePlacement } from '../test/support/placement.ts';

const TOLERANCE = 1e-3;
const choice = (process.argv[2] ?? 'cuda') as DeviceChoice;
const t0 = performance.now();
const say = (s: string) => process.stdout.write(`cuda-check ${Math.round(performance.now() - t0)} ms: ${s}\n`);
const failures: string[] = [];
const check = (ok: boolean, what: string) => {
  say(`${ok ? 'ok' : 'FAILED'}: ${what}`);
  if (!ok) failures.push(what);
};

const placement = await resolveDevice(choice, { cudaLibDirs: parseLibDirs(process.env.REFT_CUDA_LIB_DIR) }).catch((e: Error) => {
  say(`FAILED: --device ${choice}: ${e.message}`);
  process.exit(2);
});
say(`device ${placement.device} (${placement.adapter})`);
const model = await loadModel(STORIES);
const cases = inferenceCases();
const cpu = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir });
let t = performance.now();
const gpu = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir, device: placement.device });
say(`engine on ${placement.device} created in ${Math.round(performance.now() - t)} ms`);

// where ORT places the decoder graph built for this device (nodes left on the CPU cost a copy)
const device = placement.device;
const graph = buildDecoderGraph(model.config, model.checkpoint, 'separate', device);
const placed = await nodePlacement(graph, model.checkpoint.dataDir, device as 'cpu');
const byProvider = Object.fromEntries([...placed].map(([p, nodes]) => [p, nodes.length]));
say(`node placement: ${JSON.stringify(byProvider)}`);
const onCpu = placed.get('CPUExecutionProvider') ?? [];
say(`on the CPU provider: ${JSON.stringify([...new Set(onCpu.map((n) => n.op))])}`);

const logitDiffs: Record<string, { cpu: number; reference: number }> = {};
t = performance.now();
for (const c of cases) {
  const input: PrefillInput = { tokens: c.prompt, interventions: c.interventions, allLogits: true };
  const [onGpu] = await gpu.prefill([input]);
  const [onHost] = await cpu.prefill([input]);
  gpu.release(onGpu.id);
  cpu.release(onHost.id);
  logitDiffs[c.name] = { cpu: maxAbsDiff(onGpu.logits, onHost.logits), reference: maxAbsDiff(onGpu.logits, c.logits) };
  check(
    logitDiffs[c.name].cpu < TOLERANCE && logitDiffs[c.name].reference < TOLERANCE,
    `${c.name}: logits at every prompt position within ${TOLERANCE} of the CPU (${logitDiffs[c.name].cpu.toExponential(2)}) and the reference (${logitDiffs[c.name].reference.toExponential(2)})`,
  );
}
say(`prefill of ${cases.length} cases in ${Math.round(performance.now() - t)} ms`);

const rows = cases.map((c) => ({ tokens: c.prompt, interventions: c.interventions }));
for (const [i, c] of cases.entries()) {
  const [alone] = await greedyBatch(gpu, [rows[i]], c.greedy.length);
  check(JSON.stringify(alone) === JSON.stringify(c.greedy), `${c.name}: greedy tokens alone equal the reference's (${c.greedy.length})`);
}
const steps = Math.max(...cases.map((c) => c.greedy.length));
t = performance.now();
const onGpu = await greedyBatch(gpu, rows, steps);
const batchMs = performance.now() - t;
const onHost = await greedyBatch(cpu, rows, steps);
check(
  JSON.stringify(onGpu) === JSON.stringify(onHost),
  `all ${cases.length} cases in one batch, ${steps} steps: greedy tokens equal the CPU's`,
);
check(
  cases.every((c, i) => JSON.stringify(onGpu[i].slice(0, c.greedy.length)) === JSON.stringify(c.greedy)),
  'and the reference greedy continuations',
);

// KV-cached decoding equals recomputing the whole sequence
const c = cases[5];
const [first] = await gpu.prefill([{ tokens: c.prompt, interventions: c.interventions }]);
const tokens = [...c.prompt, argmax(first.logits)];
let worst = 0;
for (let step = 0; step < 12; step++) {
  const cached = (await gpu.decode(new Map([[first.id, tokens.at(-1)!]]))).get(first.id)!;
  const [full] = await gpu.prefill([{ tokens, interventions: c.interventions, promptLength: c.prompt.length }]);
  gpu.release(full.id);
  worst = Math.max(worst, maxAbsDiff(cached, full.logits));
  tokens.push(argmax(cached));
}
gpu.release(first.id);
check(worst < TOLERANCE, `KV-cached decoding equals full recomputation over 12 steps (${worst.toExponential(2)})`);

// The open question asked of the binding itself (README, CUDA): can a CUDA session's output stay
// on the device? The 1.29 binding binds 'gpu-buffer' outputs to WebGPU's memory name; see what a
// CUDA session makes of that, and whether such an output can be fed back in.
let binding = 'not asked (not on CUDA)';
if (placement.device === 'cuda') {
  const g = new GraphBuilder('binding_probe');
  g.output(g.op('Relu', [g.input('x', 'float32', [2])]), 'y', 'float32', [2]);
  const x = new ort.Tensor('float32', Float32Array.from([-1, 2]), [2]);
  try {
    const s = await ort.InferenceSession.create(g.encode({ '': 21 }), {
      executionProviders: ['cuda'],
      preferredOutputLocation: 'gpu-buffer',
    });
    const y = (await s.run({ x })).y;
    binding = `a gpu-buffer output on CUDA came back with location ${y.location}`;
    if (y.location === 'gpu-buffer') {
      const plain = await ort.InferenceSession.create(g.encode({ '': 21 }), { executionProviders: ['cuda'] });
      const back = await plain.run({ x: y }).then(
        (r) => `fed back in: [${Array.from(r.y.data as Float32Array).join(', ')}] (want [0, 2])`,
        (e: Error) => `fed back in, refused: ${e.message}`,
      );
      binding += `; ${back}`;
      await plain.release();
    }
    await s.release();
  } catch (e) {
    binding = `a gpu-buffer output on CUDA fails: ${(e as Error).message}`;
  }
  say(`binding: ${binding}`);
}

await gpu.close();
await cpu.close();
const summary = {
  binding,
  device: placement,
  cases: cases.length,
  failures,
  node_placement: byProvider,
  cpu_ops: [...new Set(onCpu.map((n) => n.op))],
  logit_diffs: logitDiffs,
  batch_greedy_ms: Math.round(batchMs),
};
process.stdout.write(`${JSON.stringify(summary)}\n`);
say(failures.length ? `${failures.length} checks FAILED` : 'all checks passed');
process.exitCode = failures.length ? 1 : 0;
