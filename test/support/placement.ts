import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { testCacheDir } from './engine.ts';

/** One graph node as ORT's session log names it. */
export interface PlacedNode {
  op: string;
  name: string;
}

/**
 * Where ORT places each node of `graph` under `providers`, read from its verbose session log
 * ("Node(s) placed on [XExecutionProvider]" followed by one "Op (name)" line per node). The
 * session is created in a child process: ORT's log goes to the native stderr, which this
 * process cannot capture.
 */
export async function nodePlacement(graph: Uint8Array, dataDir: string, provider: 'webgpu' | 'cpu'): Promise<Map<string, PlacedNode[]>> {
  const file = join(testCacheDir, `placement-${process.pid}-${Date.now()}.onnx`);
  writeFileSync(file, graph);
  const script = `
    const ort = require('onnxruntime-node');
    const fs = require('node:fs');
    ort.InferenceSession.create(fs.readFileSync(process.argv[1]), {
      executionProviders: [process.argv[3]],
      logSeverityLevel: 0,
      logVerbosityLevel: 0,
      extra: { session: { model_external_initializers_file_folder_path: process.argv[2] } },
    }).then((s) => s.release(), (e) => { console.error('SESSION FAILED: ' + e.message); process.exit(1); });
  `;
  const { stdout, stderr } = await promisify(execFile)(process.execPath, ['-e', script, file, dataDir, provider], {
    maxBuffer: 256 * 1024 * 1024,
  });
  return parsePlacement(stdout + stderr);
}

export function parsePlacement(log: string): Map<string, PlacedNode[]> {
  const placed = new Map<string, PlacedNode[]>();
  let current: PlacedNode[] | null = null;
  for (const line of log.split('\n')) {
    // "All nodes placed on [X]" when one provider takes every node: no per-node lines follow
    const header = /(?:Node\(s\)|All nodes) placed on \[(\w+)\]/.exec(line);
    if (header) {
      current = [];
      placed.set(header[1], current);
      continue;
    }
    const node = /VerifyEachNodeIsAssignedToAnEp\]\s{3}(\S+) \((.*)\)\s*$/.exec(line);
    if (node && current) current.push({ op: node[1], name: node[2] });
    else if (!/VerifyEachNodeIsAssignedToAnEp/.test(line)) current = null;
  }
  if (placed.size === 0) throw new Error(`no node placement in ORT's log:\n${log.slice(-2000)}`);
  return placed;
}

/**
 * Operators that only compute shapes and indices: ORT keeps these on the CPU on purpose (their
 * small int64 results steer kernels), so a graph may leave them there under any provider.
 */
const SHAPE_OPS = new Set(['Shape', 'Size', 'Unsqueeze', 'Squeeze', 'Range', 'ConstantOfShape', 'Slice', 'Reshape']);

/** The compute nodes ORT placed on the CPU, shape-only ones left out. */
export function cpuComputeNodes(placement: Map<string, PlacedNode[]>): PlacedNode[] {
  return (placement.get('CPUExecutionProvider') ?? []).filter((n) => !SHAPE_OPS.has(n.op));
}
