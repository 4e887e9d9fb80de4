import { crc32 } from 'node:zlib';

/**
 * Hand-built `torch.save` files for hostile-input tests: a stored zip of records under one top
 * folder, and the pickle opcodes a state dict is written with.
 */
export function torchZip(records: Record<string, Uint8Array>, folder = 'archive'): Uint8Array {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const [name, data] of Object.entries(records)) {
    const fileName = Buffer.from(`${folder}/${name}`, 'utf8');
    const crc = crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.byteLength, 18);
    local.writeUInt32LE(data.byteLength, 22);
    local.writeUInt16LE(fileName.byteLength, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(20, 4);
    central.writeUInt16LE(20, 6);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(data.byteLength, 20);
    central.writeUInt32LE(data.byteLength, 24);
    central.writeUInt16LE(fileName.byteLength, 28);
    central.writeUInt32LE(offset, 42);
    locals.push(local, fileName, Buffer.from(data));
    centrals.push(central, fileName);
    offset += 30 + fileName.byteLength + data.byteLength;
  }
  const cd = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(Object.keys(records).length, 8);
  end.writeUInt16LE(Object.keys(records).length, 10);
  end.writeUInt32LE(cd.byteLength, 12);
  end.writeUInt32LE(offset, 16);
  return new Uint8Array(Buffer.concat([...locals, cd, end]));
}

/** Pickle bytes from opcode bytes and latin1 strings. */
export function pickleBytes(...parts: Array<number[] | string | Uint8Array>): Uint8Array {
  return Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : Buffer.from(p))));
}

const u = (s: string) => pickleBytes([0x8c, s.length], s); // SHORT_BINUNICODE
const int = (n: number) => {
  const b = Buffer.alloc(5);
  b[0] = 0x4a; // BININT
  b.writeInt32LE(n, 1);
  return b;
};

/**
 * A state dict `{name: tensor}` whose tensors are views `(size, stride)` over one F32 storage
 * "0" of `storageElements` elements (records: data.pkl and data/0).
 */
export function stateDictOfViews(views: Array<{ name: string; size: number[]; stride: number[] }>, storageElements: number): Uint8Array {
  const storage = pickleBytes([0x28], u('storage'), 'ctorch\nFloatStorage\n', u('0'), u('cpu'), int(storageElements), [0x74, 0x51]); // (... t Q
  const entries = views.map((v) =>
    pickleBytes(
      u(v.name),
      'ctorch._utils\n_rebuild_tensor_v2\n',
      [0x28], // MARK: the argument tuple
      storage,
      int(0),
      [0x28],
      ...v.size.map(int),
      [0x74], // size tuple
      [0x28],
      ...v.stride.map(int),
      [0x74], // stride tuple
      [0x89, 0x7d, 0x74, 0x52, 0x73], // False, {}, TUPLE, REDUCE, SETITEM
    ),
  );
  const pkl = pickleBytes([0x80, 2, 0x7d], ...entries, [0x2e]);
  return torchZip({ 'data.pkl': pkl, 'data/0': new Uint8Array(4 * storageElements) });
}
