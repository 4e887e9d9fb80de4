import { open, type FileHandle } from 'node:fs/promises';

/**
 * Just enough of an ELF64 little-endian reader (x86-64 Linux shared libraries) to say what a
 * provider library needs and which ORT built it, without loading it: its machine, its
 * DT_NEEDED entries and the strings of a section. Reads only the headers and the sections asked
 * for (the CUDA provider is 230 MB; its .rodata 26 MB).
 */

const EM_X86_64 = 62;
const DT_NULL = 0n;
const DT_NEEDED = 1n;

interface Section {
  name: string;
  offset: number;
  size: number;
  /** The section this one's strings live in (.dynamic → .dynstr). */
  link: number;
}

export interface ElfLibrary {
  machine: 'x86-64' | `machine ${number}`;
  /** The libraries it names as DT_NEEDED, in order (the order the dynamic loader maps them). */
  needed: string[];
}

export class ElfError extends Error {}

async function readAt(f: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await f.read(buf, 0, length, offset);
  if (bytesRead !== length) throw new ElfError(`truncated at byte ${offset + bytesRead}`);
  return buf;
}

async function sections(f: FileHandle): Promise<{ machine: number; sections: Section[] }> {
  const h = await readAt(f, 0, 64);
  if (h.readUInt32BE(0) !== 0x7f454c46) throw new ElfError('not an ELF file');
  if (h[4] !== 2 || h[5] !== 1) throw new ElfError('not a 64-bit little-endian ELF file');
  const machine = h.readUInt16LE(18);
  const shoff = Number(h.readBigUInt64LE(0x28));
  const shentsize = h.readUInt16LE(0x3a);
  const shnum = h.readUInt16LE(0x3c);
  const shstrndx = h.readUInt16LE(0x3e);
  const table = await readAt(f, shoff, shentsize * shnum);
  const raw = Array.from({ length: shnum }, (_, i) => {
    const at = i * shentsize;
    return {
      nameAt: table.readUInt32LE(at),
      offset: Number(table.readBigUInt64LE(at + 24)),
      size: Number(table.readBigUInt64LE(at + 32)),
      link: table.readUInt32LE(at + 40),
    };
  });
  const names = await readAt(f, raw[shstrndx].offset, raw[shstrndx].size);
  const cstr = (buf: Buffer, at: number) => buf.toString('latin1', at, buf.indexOf(0, at));
  return { machine, sections: raw.map((s) => ({ name: cstr(names, s.nameAt), offset: s.offset, size: s.size, link: s.link })) };
}

/** The machine a shared library is built for and the libraries it needs. */
export async function readElfLibrary(path: string): Promise<ElfLibrary> {
  const f = await open(path, 'r');
  try {
    const { machine, sections: all } = await sections(f);
    const dynamic = all.find((s) => s.name === '.dynamic');
    const needed: string[] = [];
    if (dynamic) {
      const dyn = await readAt(f, dynamic.offset, dynamic.size);
      const strtab = all[dynamic.link];
      const strings = await readAt(f, strtab.offset, strtab.size);
      for (let at = 0; at + 16 <= dyn.length; at += 16) {
        const tag = dyn.readBigInt64LE(at);
        if (tag === DT_NULL) break;
        if (tag === DT_NEEDED) {
          const i = Number(dyn.readBigUInt64LE(at + 8));
          needed.push(strings.toString('latin1', i, strings.indexOf(0, i)));
        }
      }
    }
    return { machine: machine === EM_X86_64 ? 'x86-64' : `machine ${machine}`, needed };
  } finally {
    await f.close();
  }
}

/**
 * The version-like strings (`1.29.0`) of a library's read-only data: whole NUL-terminated
 * strings of digits and dots only. ORT compiles its version in as such a string (ORT_VERSION,
 * e.g. for the tuning results' validator), once in the core library and once in each provider.
 */
export async function embeddedVersions(path: string, section = '.rodata'): Promise<string[]> {
  const f = await open(path, 'r');
  try {
    const s = (await sections(f)).sections.find((x) => x.name === section);
    if (!s) return [];
    const data = await readAt(f, s.offset, s.size);
    const found = new Set<string>();
    // a string starts after a NUL: scan for the NULs, then test what lies between two of them
    let start = 0;
    for (let end = data.indexOf(0, start); end !== -1; start = end + 1, end = data.indexOf(0, start)) {
      const length = end - start;
      if (length < 5 || length > 16) continue;
      const text = data.toString('latin1', start, end);
      if (/^\d+\.\d+\.\d+$/.test(text)) found.add(text);
    }
    return [...found];
  } finally {
    await f.close();
  }
}
