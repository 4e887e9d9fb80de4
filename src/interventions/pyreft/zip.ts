import { crc32 } from 'node:zlib';
import yauzl from 'yauzl';
import { ReftError, pyreftZipInvalid } from '../../errors.ts';

/**
 * The container `torch.save` writes: a zip of stored (uncompressed) records, all under one top
 * folder, with sizes only in the central directory (local headers say 0 and a data descriptor
 * follows each record). yauzl parses the central directory (ZIP64 included); every record is then
 * checked against the bytes actually present before anyone reads it.
 */
export interface TorchZip {
  /** Records by their name inside the folder: `data.pkl`, `data/0`, `version`, ... */
  records: Map<string, Uint8Array>;
}

/** Generous bound: a state dict has a handful of tensors, each one record. */
const MAX_ENTRIES = 10_000;
const STORED = 0;
const DATA_DESCRIPTOR_FLAG = 0x8;
const DATA_DESCRIPTOR_SIGNATURE = 0x08074b50;

/** Reads and checks a torch zip held in memory. `file` names it in every error. */
export async function readTorchZip(bytes: Uint8Array, file: string): Promise<TorchZip> {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const entries = await listEntries(buffer, file);
  if (entries.length === 0) throw broken(file, 'the zip has no entries');
  const folder = topFolder(entries[0].entry.fileName, file);
  const records = new Map<string, Uint8Array>();
  for (const { entry, dataStart } of entries) {
    const name = recordName(entry.fileName, folder, file);
    if (records.has(name)) throw broken(file, `record ${entry.fileName} appears twice`);
    records.set(name, recordBytes(buffer, entry, dataStart, file));
  }
  checkNoOverlap(entries, file);
  if (!records.has('data.pkl')) throw broken(file, `missing ${folder}/data.pkl (not a torch.save file?)`);
  checkByteOrder(records, file);
  return { records };
}

interface LocatedEntry {
  entry: yauzl.Entry;
  /** Absolute offset of the record's first byte (after the local header). */
  dataStart: number;
}

/** Central directory entries, each with its local header checked and its data located. */
async function listEntries(buffer: Buffer, file: string): Promise<LocatedEntry[]> {
  let zip: yauzl.ZipFile;
  try {
    zip = await yauzl.fromBufferPromise(buffer, { lazyEntries: true, strictFileNames: true, validateEntrySizes: true });
  } catch (e) {
    throw broken(file, `${describe(e)} (truncated or not a zip)`);
  }
  try {
    if (zip.entryCount > MAX_ENTRIES) throw broken(file, `the zip declares ${zip.entryCount} entries (at most ${MAX_ENTRIES})`);
    const out: LocatedEntry[] = [];
    try {
      for await (const entry of zip.eachEntry()) out.push(await locate(zip, entry, file));
    } catch (e) {
      if (e instanceof ReftError) throw e;
      // yauzl's central-directory errors do not say which entry: say it (1-based, as listed).
      throw broken(file, `central directory entry ${out.length + 1} of ${zip.entryCount}: ${describe(e)}`);
    }
    return out;
  } finally {
    zip.close();
  }
}

async function locate(zip: yauzl.ZipFile, entry: yauzl.Entry, file: string): Promise<LocatedEntry> {
  const name = entry.fileName;
  if (entry.isEncrypted()) throw broken(file, `record ${name} is encrypted`);
  // torch writes every record stored; a compressed one means the file did not come from torch.save.
  if (entry.compressionMethod !== STORED) throw broken(file, `record ${name} is compressed (method ${entry.compressionMethod}); torch.save writes stored records`);
  if (entry.compressedSize !== entry.uncompressedSize) {
    throw broken(file, `record ${name} is stored but its sizes differ (${entry.compressedSize} vs ${entry.uncompressedSize})`);
  }
  let local: yauzl.LocalFileHeader;
  try {
    local = await zip.readLocalFileHeaderPromise(entry);
  } catch (e) {
    throw broken(file, `record ${name}: ${describe(e)}`);
  }
  if (!local.fileName.equals(entry.fileNameRaw)) throw broken(file, `record ${name}: local header names ${JSON.stringify(local.fileName.toString('utf8'))}`);
  return { entry, dataStart: local.fileDataStart };
}

/** The record's bytes, proven by its CRC and (when flagged) its data descriptor. */
function recordBytes(buffer: Buffer, entry: yauzl.Entry, dataStart: number, file: string): Uint8Array {
  const size = entry.compressedSize;
  if (dataStart + size > buffer.byteLength) {
    throw broken(file, `record ${entry.fileName} claims ${size} bytes but the file ends ${buffer.byteLength - dataStart} bytes after its start`);
  }
  const data = buffer.subarray(dataStart, dataStart + size);
  if (crc32(data) !== entry.crc32) {
    throw broken(file, `record ${entry.fileName}: the central directory's size ${size} or CRC does not match the bytes (CRC mismatch)`);
  }
  if (entry.generalPurposeBitFlag & DATA_DESCRIPTOR_FLAG) checkDataDescriptor(buffer, entry, dataStart + size, file);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/**
 * The descriptor right after the data repeats the CRC and sizes: if the central directory lied
 * about a size, the descriptor is not where the size says. (The signature is optional in the zip
 * spec; the compressed size is at the same offset in the 32- and 64-bit forms, so its low 32 bits
 * are compared.)
 */
function checkDataDescriptor(buffer: Buffer, entry: yauzl.Entry, at: number, file: string): void {
  const lie = () => broken(file, `record ${entry.fileName}: no data descriptor after its ${entry.compressedSize} bytes (its size lies)`);
  if (at + 12 > buffer.byteLength) throw lie();
  const start = buffer.readUInt32LE(at) === DATA_DESCRIPTOR_SIGNATURE ? at + 4 : at;
  if (start + 8 > buffer.byteLength) throw lie();
  if (buffer.readUInt32LE(start) !== entry.crc32 || buffer.readUInt32LE(start + 4) !== entry.compressedSize % 2 ** 32) throw lie();
}

function topFolder(firstName: string, file: string): string {
  const slash = firstName.indexOf('/');
  if (slash <= 0) throw broken(file, `first entry ${JSON.stringify(firstName)} is not inside a top folder`);
  return firstName.slice(0, slash);
}

function recordName(fileName: string, folder: string, file: string): string {
  if (!fileName.startsWith(`${folder}/`) || fileName.length === folder.length + 1) {
    throw broken(file, `entry ${JSON.stringify(fileName)} is not under the top folder ${JSON.stringify(folder)}`);
  }
  return fileName.slice(folder.length + 1);
}

/** Records (local header through data) must not share bytes: each byte has one meaning. */
function checkNoOverlap(entries: LocatedEntry[], file: string): void {
  const spans = entries
    .map((e) => ({ name: e.entry.fileName, start: e.entry.relativeOffsetOfLocalHeader, end: e.dataStart + e.entry.compressedSize }))
    .sort((a, b) => a.start - b.start);
  for (let i = 1; i < spans.length; i++) {
    if (spans[i].start < spans[i - 1].end) throw broken(file, `records ${spans[i - 1].name} and ${spans[i].name} overlap`);
  }
}

/** torch ≥ 2.1 records the byte order of the storages; only little-endian is read here. */
function checkByteOrder(records: Map<string, Uint8Array>, file: string): void {
  const order = records.get('byteorder');
  if (order === undefined) return; // older torch: always little-endian
  const text = Buffer.from(order).toString('latin1');
  if (text !== 'little') throw broken(file, `byteorder record is ${JSON.stringify(text)}; only "little" is supported`);
}

function broken(file: string, message: string) {
  return pyreftZipInvalid({ file, problem: message }, file);
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
