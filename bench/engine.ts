import * as ort from 'onnxruntime-node';
import { Engine, type PrefillInput } from '../src/engine/engine.ts';
import { argmax } from '../src/engine/sampler.ts';
import { Rng } from '../src/rng.ts';
import { GraphBuilder } from '../src/graph/onnx.ts';
import { lowRank, type LowRankIntervention } from '../src/interventions/artifact.ts';
import { parsePositions } from '../src/interventions/positions.ts';
import type { LoadedModel } from '../src/model/load.ts';
import { median, round } from './machine.ts';

/**
 * Issue 2's engine benchmark on the 135M-shape model: decode at batch 1 and 8 next to the
 * memory-bandwidth ceiling measured in the same run, prefill overhead of interventions, and
 * decode after an intervened prompt vs a plain one. Variants are interleaved and medians
 * reported, since the machine is shared.
 */
/** ORT's read bandwidth with `threads` threads: a row-sum over 512 MiB, far beyond the caches. */
export async function bandwidthProbe(threads: number): Promise<{ measure(): Promise<number>; release(): Promise<void> }> {
  const rows = 4096;
  const cols = 32768;
  const g = new GraphBuilder('bandwidth');
  const x = g.input('x', 'float32', [rows, cols]);
  g.output(g.op('ReduceSum', [x, g.int64s('axes', [1])], { keepdims: 0 }), 'y', 'float32', [rows]);
  const session = await ort.InferenceSession.create(g.encode({ '': 21 }), {
    intraOpNumThreads: threads,
    // no spinning: idle probe threads must not steal cycles from the decode measured next
    extra: { session: { intra_op: { allow_spinning: '0' } } },
  } as ort.InferenceSession.SessionOptions);
  const data = new Float32Array(rows * cols).fill(1);
  const feeds = { x: new ort.Tensor('float32', data, [rows, cols]) };
  await session.run(feeds);
  return {
    async measure() {
      const times: number[] = [];
      for (let i = 0; i < 7; i++) {
        const t = performance.now();
        await session.run(feeds);
        times.push(performance.now() - t);
      }
      return data.byteLength / (median(times) / 1000); // bytes per second
    },
    release: () => session.release(),
  };
}

/** Bytes of weights one decode step reads: every matrix once (the embedding as the LM head). */
export function weightBytesPerStep(model: LoadedModel): number {
  let bytes = 0;
  for (const w of model.checkpoint.weights.values()) {
    if (w.name === 'model.embed_tokens.weight' && !model.config.tieWordEmbeddings) continue; // only one row is gathered
    bytes += (w.byteLength / (w.dtype === 'F32' ? 4 : 2)) * 4;
  }
  return bytes;
}

function randomIntervention(seed: number, layer: number, rank: number, positions: string, d: number): LowRankIntervention {
  const rng = new Rng(seed);
  const rand = (n: number, s: number) => Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * s);
  // orthonormal rows are not needed for timing; the shapes and kinds are what matter
  return lowRank({ kind: 'loreft', layer, rank, positions: parsePositions(positions) }, { rotate: rand(rank * d, 0.05), 'source.weight': rand(rank * d, 0.05), 'source.bias': rand(rank, 0.1) }, d);
}

function prompt(seed: number, n: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 1 + Math.floor(rng.next() * (vocab - 1)));
}

/** tokens/s of `steps` decode steps over a fresh batch. */
async function decodeRate(engine: Engine, inputs: PrefillInput[], steps: number): Promise<number> {
  const outs = await engine.prefill(inputs);
  let tokens = new Map(outs.map((o) => [o.id, argmax(o.logits)]));
  for (let i = 0; i < 3; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const t = performance.now();
  for (let i = 0; i < steps; i++) tokens = new Map([...(await engine.decode(tokens))].map(([k, v]) => [k, argmax(v)]));
  const seconds = (performance.now() - t) / 1000;
  for (const o of outs) engine.release(o.id);
  return (steps * inputs.length) / seconds;
}

async function prefillSeconds(engine: Engine, input: PrefillInput): Promise<number> {
  const t = performance.now();
  const [out] = await engine.prefill([input]);
  const seconds = (performance.now() - t) / 1000;
  engine.release(out.id);
  return seconds;
}

export async function benchEngine(model: LoadedModel, engine: Engine, log: (s: string) => void) {
  const { config } = model;
  const d = config.hiddenSize;
  const weightBytes = weightBytesPerStep(model);
  // Each decode measurement is paired with a bandwidth measurement taken right before it: the
  // machine is shared, and its speed drifts between phases more than the effects measured.
  const probe = await bandwidthProbe(2);
  const bandwidths: number[] = [];
  const b1: number[] = [];
  const b8: number[] = [];
  const ratios: number[] = [];
  for (let rep = 0; rep < 5; rep++) {
    const bw = await probe.measure();
    bandwidths.push(bw);
    const rate = await decodeRate(engine, [{ tokens: prompt(rep, 16, config.vocabSize) }], 64);
    b1.push(rate);
    ratios.push(rate / (bw / weightBytes));
    b8.push(await decodeRate(engine, Array.from({ length: 8 }, (_, i) => ({ tokens: prompt(10 * rep + i, 16, config.vocabSize) })), 32));
  }
  await probe.release();
  const bandwidth = median(bandwidths);
  const ceiling = bandwidth / weightBytes;
  const decode1 = median(b1);
  const decode8 = median(b8);
  log(`read bandwidth (2 threads): ${round(bandwidth / 1e9)} GB/s; weights per step ${round(weightBytes / 1e6, 1)} MB; ceiling ${round(ceiling, 1)} tokens/s`);
  log(`decode batch 1: ${round(decode1, 1)} tokens/s, ${round(median(ratios))} of the ceiling (median of ${ratios.length} paired runs: ${ratios.map((r) => round(r)).join(', ')}); batch 8: ${round(decode8, 1)} tokens/s aggregate`);

  const long = prompt(99, 512, config.vocabSize);
  const ivs = [3, 10, 17, 24].map((layer, i) => randomIntervention(i, Math.min(layer, config.numLayers - 1), 8, 'f7+l7', d));
  const plainPrefill: number[] = [];
  const ivPrefill: number[] = [];
  await prefillSeconds(engine, { tokens: long });
  for (let rep = 0; rep < 15; rep++) {
    plainPrefill.push(await prefillSeconds(engine, { tokens: long }));
    ivPrefill.push(await prefillSeconds(engine, { tokens: long, interventions: ivs }));
  }
  const prefillPlain = 512 / median(plainPrefill);
  const prefillIv = 512 / median(ivPrefill);
  const prefillOverhead = median(ivPrefill) / median(plainPrefill) - 1;
  log(`prefill 512 tokens: ${round(prefillPlain, 1)} tokens/s plain, ${round(prefillIv, 1)} with LoReFT r8 on 4 layers f7+l7: overhead ${round(prefillOverhead * 100, 2)}%`);

  const afterPlain: number[] = [];
  const afterIv: number[] = [];
  for (let rep = 0; rep < 9; rep++) {
    afterPlain.push(await decodeRate(engine, [{ tokens: prompt(7, 64, config.vocabSize) }], 48));
    afterIv.push(await decodeRate(engine, [{ tokens: prompt(7, 64, config.vocabSize), interventions: ivs }], 48));
  }
  const decodeRatio = median(afterIv) / median(afterPlain);
  log(`decode after an intervened prompt vs a plain one: ${round(median(afterIv), 1)} vs ${round(median(afterPlain), 1)} tokens/s (ratio ${round(decodeRatio, 3)})`);

  return {
    read_bandwidth_gb_s: round(bandwidth / 1e9),
    weight_bytes_per_step: weightBytes,
    ceiling_tokens_s: round(ceiling, 1),
    decode_batch1_tokens_s: round(decode1, 1),
    decode_batch1_of_ceiling: round(median(ratios)),
    decode_batch8_tokens_s: round(decode8, 1),
    decode_runs: { batch1: b1.map((x) => round(x, 1)), batch8: b8.map((x) => round(x, 1)), bandwidth_gb_s: bandwidths.map((x) => round(x / 1e9)), batch1_of_ceiling: ratios.map((x) => round(x)) },
    prefill512_plain_tokens_s: round(prefillPlain, 1),
    prefill512_loreft_tokens_s: round(prefillIv, 1),
    prefill_overhead_percent: round(prefillOverhead * 100, 2),
    decode_after_intervened_prompt_tokens_s: round(median(afterIv), 1),
    decode_after_plain_prompt_tokens_s: round(median(afterPlain), 1),
    decode_after_intervention_ratio: round(decodeRatio, 3),
  };
}
