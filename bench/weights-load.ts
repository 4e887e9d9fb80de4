import { StepRunner } from '../src/engine/step-runner.ts';
import { loadModel } from '../src/model/load.ts';
import type { WeightFormat } from '../src/quant/formats.ts';

/** One format's load (model, quantization or its cache, graph, session) in a fresh process: prints {loadMs, rssBytes, cache}. */
const [dir, cacheDir, format] = process.argv.slice(2);
const started = performance.now();
const model = await loadModel(dir);
const engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir, weights: format as WeightFormat });
const loadMs = performance.now() - started;
const [out] = await engine.prefill([{ tokens: [1, 2, 3] }]); // one step: the session's buffers allocated
engine.release(out.id);
process.stdout.write(`${JSON.stringify({ loadMs, rssBytes: process.memoryUsage().rss, cache: engine.weights.cache })}\n`);
await engine.close();
