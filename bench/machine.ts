import { readFileSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, totalmem } from 'node:os';
import * as ort from 'onnxruntime-node';

/** What the numbers were measured on. */
export function describeMachine(): Record<string, string | number> {
  let cpu = cpus()[0]?.model ?? 'unknown';
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    cpu = /model name\s*:\s*(.+)/.exec(info)?.[1] ?? cpu;
  } catch {
    /* not Linux */
  }
  return {
    date: new Date().toISOString(),
    cpu,
    cores: availableParallelism(),
    memory_gib: Math.round(totalmem() / 1024 ** 3),
    node: process.version,
    onnxruntime_node: ort.env.versions.node ?? 'unknown',
    load_average_1m: Math.round(loadavg()[0] * 100) / 100,
  };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

export function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

export const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;

/**
 * Runs `a` and `b` back to back `reps` times, alternating which goes first, so the machine's
 * drift between pairs cancels in each pair's comparison.
 */
export async function inPairs<T>(reps: number, a: () => Promise<T>, b: () => Promise<T>): Promise<{ a: T[]; b: T[] }> {
  const as: T[] = [];
  const bs: T[] = [];
  for (let rep = 0; rep < reps; rep++) {
    if (rep % 2) {
      as.push(await a());
      bs.push(await b());
    } else {
      bs.push(await b());
      as.push(await a());
    }
  }
  return { a: as, b: bs };
}

/** Each pair's b / a. */
export const pairRatios = (p: { a: number[]; b: number[] }): number[] => p.a.map((a, i) => p.b[i] / a);
