import { readFileSync } from 'node:fs';

/**
 * Whether this process's large allocations (ORT's prepacked weights among them) get transparent
 * huge pages. Decode reads every weight once per token, and on 4 KiB pages that stream misses
 * the TLB: on the 135M-shape bench model batch-1 decode went from 45.5–46.5 to 48.9–50.3
 * tokens/s with huge pages (three processes each). Linux gives them to all memory in mode
 * `always`, or in mode `madvise` to glibc's malloc when the process starts with
 * GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (npm start, npm run bench and the images set it).
 */
export type HugePages = 'on' | 'off' | 'unsupported';

export const HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1';

export function hugePages(env: NodeJS.ProcessEnv = process.env): HugePages {
  if (process.platform !== 'linux') return 'unsupported';
  let mode: string;
  try {
    mode = /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1] ?? 'never';
  } catch {
    return 'unsupported';
  }
  if (mode === 'always') return 'on';
  if (mode === 'madvise' && (env.GLIBC_TUNABLES ?? '').split(':').includes(HUGE_PAGES_TUNABLE)) return 'on';
  return 'off';
}

/** A log line's worth: the state and, when off but available, how to turn it on. */
export function describeHugePages(state = hugePages()): { hugePages: HugePages; hint?: string } {
  return state === 'off'
    ? { hugePages: state, hint: `start with GLIBC_TUNABLES=${HUGE_PAGES_TUNABLE} for faster decode` }
    : { hugePages: state };
}
