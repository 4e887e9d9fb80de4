import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { ReftError } from '../src/errors.ts';
import { parseArtifact } from '../src/interventions/artifact.ts';
import { writeArtifact } from '../src/interventions/directory.ts';
import { importPyreft, importPyreftDirectory, readStateDict, type PyreftImportInput } from '../src/interventions/pyreft/index.ts';
import { readPickle } from '../src/interventions/pyreft/pickle.ts';
import { readTorchZip } from '../src/interventions/pyreft/zip.ts';
import { parseSafetensors, toFloat32 } from '../src/model/safetensors.ts';
import { thrownBy } from './support/errors.ts';

/**
 * The pyreft importer against the shared fixtures (fixtures/pyreft/README.md, manifest.json):
 * every "ok" folder must reproduce its expected/ artifact, the evil pickles must be refused without
 * anything in them running, and broken containers / configs crafted by byte-editing copies of the
 * fixtures in memory must be refused with a ReftError that names the problem.
 */
const PYREFT = join(import.meta.dirname, '..', '..', 'shared', 'fixtures', 'pyreft');
const BASE = { hiddenSize: 64, numLayers: 5, architecture: 'LlamaForCausalLM' };

interface ManifestCase {
  expect: 'ok' | 'reject';
  compare?: string;
  import: { positions: string; share_weights: boolean };
}
const manifest = JSON.parse(readFileSync(join(PYREFT, 'manifest.json'), 'utf8')) as Record<string, ManifestCase>;
const okCases = Object.entries(manifest).filter(([, c]) => c.expect === 'ok');
const rejectCases = Object.entries(manifest).filter(([, c]) => c.expect === 'reject');

/** What the evil pickles would run (found with `python3 -m pickletools` on their data.pkl, never unpickled). */
const EVIL_MARKER = 'REFT_FIXTURE_EVIL_PICKLE_WAS_EXECUTED';
const EVIL_COMMAND = `echo ${EVIL_MARKER}`;

const tempDirs: string[] = [];
afterAll(() => {
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

// --- fixture access ----------------------------------------------------------------------------

function readInput(folder: string): PyreftImportInput {
  const dir = join(PYREFT, folder);
  const c = manifest[folder].import;
  const files = new Map<string, Uint8Array>();
  for (const name of readdirSync(dir)) if (name.startsWith('intkey_')) files.set(name, bytesOf(join(dir, name)));
  return { config: bytesOf(join(dir, 'config.json')), files, positions: c.positions, shareWeights: c.share_weights };
}

function bytesOf(path: string): Uint8Array {
  return new Uint8Array(readFileSync(path));
}

function configJson(input: PyreftImportInput): Record<string, any> {
  return JSON.parse(Buffer.from(input.config).toString('utf8'));
}

function withConfig(input: PyreftImportInput, edit: (json: Record<string, any>) => void): PyreftImportInput {
  const json = configJson(input);
  edit(json);
  return { ...input, config: new TextEncoder().encode(JSON.stringify(json)) };
}

function firstFile(input: PyreftImportInput): [string, Uint8Array] {
  return [...input.files.entries()].sort(([a], [b]) => a.localeCompare(b))[0];
}

function withFile(input: PyreftImportInput, name: string, bytes: Uint8Array): PyreftImportInput {
  return { ...input, files: new Map(input.files).set(name, bytes) };
}

/** Expects a ReftError with this catalogue code (and field, when given). */
async function refused(work: Promise<unknown>, code: string, field?: string): Promise<ReftError> {
  const err = await work.then(
    () => {
      throw new Error('expected a refusal, but the import succeeded');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ReftError);
  expect((err as ReftError).code).toBe(code);
  if (field !== undefined) expect((err as ReftError).field).toBe(field);
  return err as ReftError;
}

// --- zip byte editing (test-side, independent of the importer's reader) -------------------------

interface LocatedRecord {
  /** Offset of the central directory header. */
  central: number;
  /** Offset of the local header. */
  local: number;
  dataStart: number;
  size: number;
}

/** Finds a record by the end of its name, via its central directory header (stored, non-ZIP64 sizes). */
function locateRecord(zip: Uint8Array, suffix: string): LocatedRecord {
  const buf = Buffer.from(zip.buffer, zip.byteOffset, zip.byteLength);
  for (let at = buf.indexOf('PK\x01\x02', 0, 'latin1'); at >= 0; at = buf.indexOf('PK\x01\x02', at + 1, 'latin1')) {
    const nameLen = buf.readUInt16LE(at + 28);
    const name = buf.subarray(at + 46, at + 46 + nameLen).toString('utf8');
    if (!name.endsWith(`/${suffix}`)) continue;
    const local = buf.readUInt32LE(at + 42);
    const dataStart = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    return { central: at, local, dataStart, size: buf.readUInt32LE(at + 20) };
  }
  throw new Error(`record ${suffix} not found`);
}

/** Edits a record's bytes in place (same length) and re-signs it: CRC in the central directory and data descriptor. */
function patchRecord(zip: Uint8Array, suffix: string, edit: (data: Uint8Array) => void): Uint8Array {
  const out = Uint8Array.from(zip);
  const rec = locateRecord(out, suffix);
  edit(out.subarray(rec.dataStart, rec.dataStart + rec.size));
  const view = new DataView(out.buffer);
  const crc = crc32(out.subarray(rec.dataStart, rec.dataStart + rec.size));
  view.setUint32(rec.central + 16, crc, true);
  view.setUint32(rec.dataStart + rec.size + 4, crc, true); // after the descriptor's signature
  return out;
}

function replaceOnce(data: Uint8Array, from: number[], to: number[]): void {
  const at = Buffer.from(data.buffer, data.byteOffset, data.byteLength).indexOf(Buffer.from(from));
  expect(at).toBeGreaterThanOrEqual(0);
  expect(Buffer.from(data.buffer, data.byteOffset, data.byteLength).indexOf(Buffer.from(from), at + 1)).toBe(-1);
  data.set(to, at);
}

function replaceAll(zip: Uint8Array, from: string, to: string): Uint8Array {
  expect(to.length).toBe(from.length);
  const buf = Buffer.from(Uint8Array.from(zip));
  let n = 0;
  for (let at = buf.indexOf(from, 0, 'latin1'); at >= 0; at = buf.indexOf(from, at + 1, 'latin1'), n++) buf.write(to, at, 'latin1');
  expect(n).toBeGreaterThan(0);
  return new Uint8Array(buf);
}

// --- the "ok" folders ---------------------------------------------------------------------------

describe('pyreft fixtures that must import', () => {
  it.each(okCases)('%s converts to its expected reft/v1 artifact', async (folder, c) => {
    const result = await importPyreft(readInput(folder), BASE);
    const expectedConfig = readFileSync(join(PYREFT, folder, 'expected', 'reft_config.json'), 'utf8');
    expect(JSON.parse(Buffer.from(result.configBytes).toString('utf8'))).toEqual(JSON.parse(expectedConfig));
    expect(Buffer.from(result.configBytes).toString('utf8')).toBe(expectedConfig); // same formatting and key order
    expect(result.config).toEqual(JSON.parse(expectedConfig));
    compareWeights(result.weightBytes, bytesOf(join(PYREFT, folder, 'expected', 'reft_weights.safetensors')), c.compare ?? 'bit-exact');
    expect(() => parseArtifact(result.configBytes, result.weightBytes, BASE)).not.toThrow();
  });

  it('keeps an optional name', async () => {
    const result = await importPyreft({ ...readInput('loreft_bf16'), name: 'my adapter' }, BASE);
    expect(result.config.name).toBe('my adapter');
    expect(Object.keys(JSON.parse(Buffer.from(result.configBytes).toString('utf8')))).toEqual([
      'format',
      'base_model',
      'interventions',
      'name',
    ]);
  });

  it('imports a folder and writes the artifact atomically', async () => {
    const c = manifest.loreft_f32_split.import;
    const result = await importPyreftDirectory(
      join(PYREFT, 'loreft_f32_split'),
      { positions: c.positions, shareWeights: c.share_weights },
      BASE,
    );
    const out = mkdtempSync(join(tmpdir(), 'pyreft-import-'));
    tempDirs.push(out);
    await writeArtifact(join(out, 'adapter'), result);
    expect(readdirSync(join(out, 'adapter')).sort()).toEqual(['reft_config.json', 'reft_weights.safetensors']); // no temp files left
    expect(bytesOf(join(out, 'adapter', 'reft_config.json'))).toEqual(result.configBytes);
    expect(bytesOf(join(out, 'adapter', 'reft_weights.safetensors'))).toEqual(result.weightBytes);
    const again = await importPyreftDirectory(
      join(PYREFT, 'loreft_f32_split'),
      { positions: c.positions, shareWeights: c.share_weights },
      BASE,
    );
    await writeArtifact(join(out, 'adapter'), again); // overwriting works too
    expect(readdirSync(join(out, 'adapter')).length).toBe(2);
  });

  it('reads tensors as views with offsets and strides (rotate_layer [64, 4] F32, weight [4, 64] BF16)', async () => {
    const [name, bytes] = firstFile(readInput('loreft_bf16'));
    const sd = await readStateDict(bytes, name);
    expect([...sd.keys()]).toEqual(['weight', 'bias', 'rotate_layer']);
    expect(sd.get('weight')).toMatchObject({ dtype: 'BF16', shape: [4, 64] });
    expect(sd.get('rotate_layer')).toMatchObject({ dtype: 'F32', shape: [64, 4] });
  });
});

/** Tensor by tensor: same names, shapes, F32; values bit-exact, or within 1e-6 for tensors computed from the orthogonal parametrization. */
function compareWeights(actualBytes: Uint8Array, expectedBytes: Uint8Array, rule: string): void {
  const actual = parseSafetensors(actualBytes, 'actual');
  const expected = parseSafetensors(expectedBytes, 'expected');
  expect([...actual.header.tensors.keys()].sort()).toEqual([...expected.header.tensors.keys()].sort());
  const computed = rule.startsWith('rotate / proj.weight computed');
  for (const [name, info] of expected.header.tensors) {
    const mine = actual.header.tensors.get(name)!;
    expect(mine.dtype, name).toBe('F32');
    expect(mine.shape, name).toEqual(info.shape);
    const a = toFloat32(actual, mine);
    const b = toFloat32(expected, info);
    const tolerant = computed && (name.endsWith('.rotate') || name.endsWith('.proj.weight'));
    if (tolerant) {
      for (let i = 0; i < b.length; i++) expect(Math.abs(a[i] - b[i]), `${name}[${i}]`).toBeLessThanOrEqual(1e-6);
    } else {
      expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer)), `${name} bit-exact`).toBe(true);
    }
  }
}

// --- evil pickles ---------------------------------------------------------------------------------

describe('pickles that must be refused', () => {
  const forbidden: Record<string, RegExp> = {
    evil: /forbidden pickle global "os system" in intkey_layer_2_comp_block_output_unit_pos_nunit_1#0\.bin/,
    evil_stack_global:
      /forbidden pickle opcode STACK_GLOBAL \(global "posix system"\) in intkey_layer_2_comp_block_output_unit_pos_nunit_1#0\.bin/,
  };

  it('covers every folder the manifest marks "reject"', () => {
    expect(rejectCases.map(([f]) => f).sort()).toEqual(Object.keys(forbidden).sort());
  });

  it.each(rejectCases)('%s is refused naming the forbidden global', async (folder) => {
    const err = await refused(importPyreft(readInput(folder), BASE), 'pyreft_pickle_refused');
    expect(err.message).toMatch(forbidden[folder]); // names the global it refused
    expect(err.field).toMatch(/^intkey_.*\.bin$/);
  });

  it.each(rejectCases)('%s: the payload is present in data.pkl but never runs', async (folder) => {
    // The payload really is there: its data.pkl carries the shell command (read as bytes, not unpickled).
    const [name, bytes] = firstFile(readInput(folder));
    const zip = await readTorchZip(bytes, name);
    expect(Buffer.from(zip.records.get('data.pkl')!).toString('latin1')).toContain(EVIL_COMMAND);
    // Its only effect would be the marker on the process's stdout: import in a child process and
    // check that the marker never appears while the refusal does.
    const dir = join(PYREFT, folder);
    const script = [
      `import { importPyreftDirectory } from ${JSON.stringify(join(import.meta.dirname, '..', 'src', 'interventions', 'pyreft', 'index.ts'))};`,
      `try { await importPyreftDirectory(${JSON.stringify(dir)}, { positions: 'f1+l1', shareWeights: true }, ${JSON.stringify(BASE)}); console.log('IMPORTED'); }`,
      `catch (e) { console.log('REFUSED ' + e.name + ': ' + e.message); }`,
    ].join('\n');
    const run = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: join(import.meta.dirname, '..'),
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/^REFUSED ReftError: forbidden pickle/m);
    expect(run.stdout + run.stderr).not.toContain(EVIL_MARKER);
  });
});

describe('the restricted pickle reader', () => {
  const src = { file: 'x.bin', record: () => undefined };
  const pickle = (...parts: Array<number[] | string>) =>
    Uint8Array.from(parts.flatMap((p) => (typeof p === 'string' ? [...Buffer.from(p, 'latin1')] : p)));

  it('reads plain data', () => {
    // PROTO 2, EMPTY_DICT, SHORT_BINUNICODE 'a', BININT1 7, SETITEM, STOP
    const v = readPickle(pickle([0x80, 2, 0x7d, 0x8c, 1], 'a', [0x4b, 7, 0x73, 0x2e]), src);
    expect(v).toMatchObject({ entries: new Map([['a', 7]]) });
  });

  it('refuses any global outside the allowlist, by name', () => {
    expect(thrownBy(() => readPickle(pickle([0x80, 2], 'cbuiltins\neval\n'), src)).code).toBe('pyreft_pickle_refused');
  });

  it('refuses opcodes outside the allowlist, by name', () => {
    expect(thrownBy(() => readPickle(pickle([0x80, 2], 'ios\nsystem\n'), src)).code).toBe('pyreft_pickle_refused');
    expect(thrownBy(() => readPickle(pickle([0x80, 2, 0x81]), src)).code).toBe('pyreft_pickle_refused');
  });

  it('refuses calling an allowed global that is not a callable it interprets', () => {
    // GLOBAL torch FloatStorage, EMPTY_TUPLE, REDUCE
    expect(thrownBy(() => readPickle(pickle([0x80, 2], 'ctorch\nFloatStorage\n', [0x29, 0x52, 0x2e]), src)).code).toBe(
      'pyreft_pickle_refused',
    );
  });

  it('refuses a truncated pickle', () => {
    expect(thrownBy(() => readPickle(pickle([0x80, 2, 0x58, 9, 0, 0, 0], 'ab'), src)).code).toBe('pyreft_pickle_refused');
  });
});

// --- broken containers ------------------------------------------------------------------------------

describe('broken intkey files', () => {
  it('refuses zips cut at any point, naming the file', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    for (const cut of [0, 1, 30, 200, Math.floor(bytes.length / 2), bytes.length - 100, bytes.length - 23, bytes.length - 1]) {
      await refused(importPyreft(withFile(input, name, bytes.subarray(0, cut)), BASE), 'pyreft_zip_invalid', name);
    }
  });

  it('refuses a zip without data.pkl', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    await refused(importPyreft(withFile(input, name, replaceAll(bytes, '/data.pkl', '/data.pkx')), BASE), 'pyreft_zip_invalid', name);
  });

  it('refuses records whose central-directory sizes lie', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    const rec = locateRecord(bytes, 'data/2');
    for (const size of [rec.size - 4, rec.size + 4, rec.size * 1000]) {
      const lying = Uint8Array.from(bytes);
      const view = new DataView(lying.buffer);
      view.setUint32(rec.central + 20, size, true);
      view.setUint32(rec.central + 24, size, true);
      await refused(importPyreft(withFile(input, name, lying), BASE), 'pyreft_zip_invalid', name);
    }
  });

  it('refuses stored sizes that disagree, and compressed records', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    const rec = locateRecord(bytes, 'data/0');
    const mismatch = Uint8Array.from(bytes);
    new DataView(mismatch.buffer).setUint32(rec.central + 24, rec.size + 2, true);
    await refused(importPyreft(withFile(input, name, mismatch), BASE), 'pyreft_zip_invalid');
    const deflated = Uint8Array.from(bytes);
    new DataView(deflated.buffer).setUint16(rec.central + 10, 8, true);
    await refused(importPyreft(withFile(input, name, deflated), BASE), 'pyreft_zip_invalid');
  });

  it('refuses a record whose bytes were changed without its CRC', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    const rec = locateRecord(bytes, 'data/1');
    const flipped = Uint8Array.from(bytes);
    flipped[rec.dataStart] ^= 1;
    await refused(importPyreft(withFile(input, name, flipped), BASE), 'pyreft_zip_invalid');
  });

  it('refuses entries outside the top folder', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    const folder = name.replace(/\.bin$/, '');
    const moved = replaceAll(bytes, `${folder}/version`, `j${folder.slice(1)}/version`);
    await refused(importPyreft(withFile(input, name, moved), BASE), 'pyreft_zip_invalid');
  });

  it('refuses a byteorder other than little', async () => {
    const input = readInput('loreft_bf16_torch2_records');
    const [name, bytes] = firstFile(input);
    const big = patchRecord(bytes, 'byteorder', (d) => d.set(Buffer.from('big\0\0\0', 'latin1')));
    await refused(importPyreft(withFile(input, name, big), BASE), 'pyreft_zip_invalid');
  });

  it('refuses a storage shorter than the tensor it backs', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    // rotate_layer's size (64, 4) = BININT1 64, BININT1 4, TUPLE2 → (65, 4): 260 elements over a 256-element storage.
    const tooBig = patchRecord(bytes, 'data.pkl', (pkl) => replaceOnce(pkl, [0x4b, 64, 0x4b, 4, 0x86], [0x4b, 65, 0x4b, 4, 0x86]));
    await refused(importPyreft(withFile(input, name, tooBig), BASE), 'pyreft_tensor_invalid', name);
    // bias: storage offset 0 → 1, so its 4 elements reach past the 4-element storage.
    const shifted = patchRecord(bytes, 'data.pkl', (pkl) =>
      replaceOnce(pkl, [0x51, 0x4b, 0, 0x4b, 4, 0x85], [0x51, 0x4b, 1, 0x4b, 4, 0x85]),
    );
    await refused(importPyreft(withFile(input, name, shifted), BASE), 'pyreft_tensor_invalid');
  });

  it('refuses a storage whose record holds fewer bytes than it declares', async () => {
    const input = readInput('loreft_bf16');
    const [name, bytes] = firstFile(input);
    // bias storage declared with 5 elements (BININT1 4 → 5) while data/1 holds 4 BF16.
    const declared = patchRecord(bytes, 'data.pkl', (pkl) =>
      replaceOnce(pkl, [0x58, 1, 0, 0, 0, 0x31, 0x71, 15, 0x68, 7, 0x4b, 4], [0x58, 1, 0, 0, 0, 0x31, 0x71, 15, 0x68, 7, 0x4b, 5]),
    );
    await refused(importPyreft(withFile(input, name, declared), BASE), 'pyreft_tensor_invalid');
  });
});

// --- config.json that does not match the files ----------------------------------------------------

describe('config.json that does not match the files', () => {
  const input = () => readInput('loreft_bf16');

  it('refuses a sorted_key without its file', async () => {
    const i = input();
    const [name] = firstFile(i);
    const files = new Map(i.files);
    files.delete(name);
    await refused(importPyreft({ ...i, files }, BASE), 'pyreft_file_missing', name);
    await refused(
      importPyreftDirectory(join(PYREFT, 'loreft_bf16', 'expected'), { positions: 'f1', shareWeights: true }, BASE),
      'pyreft_file_missing',
    );
  });

  it('refuses a file that sorted_keys does not name', async () => {
    const i = input();
    await refused(
      importPyreft(withFile(i, 'intkey_layer_4_comp_block_output_unit_pos_nunit_1#0.bin', firstFile(i)[1]), BASE),
      'pyreft_file_unexpected',
    );
  });

  it('refuses wrong intervention_dimensions', async () => {
    await refused(
      importPyreft(
        withConfig(input(), (j) => (j.intervention_dimensions[1] = 32)),
        BASE,
      ),
      'pyreft_dimension_mismatch',
    );
  });

  it('refuses lists of different lengths', async () => {
    await refused(
      importPyreft(
        withConfig(input(), (j) => j.intervention_types.pop()),
        BASE,
      ),
      'pyreft_config_invalid',
    );
  });

  it('refuses a class that does not match the tensors', async () => {
    const cls = "<class 'pyreft.interventions.NoreftIntervention'>";
    await refused(
      importPyreft(
        withConfig(input(), (j) => (j.intervention_types[0] = cls)),
        BASE,
      ),
      'pyreft_class_mismatch',
    );
  });

  it('refuses an unknown class', async () => {
    await refused(
      importPyreft(
        withConfig(input(), (j) => (j.intervention_types[0] = "<class 'my.Custom'>")),
        BASE,
      ),
      'pyreft_config_invalid',
    );
  });

  it('refuses a low_rank_dimension that disagrees with the tensors', async () => {
    await refused(
      importPyreft(
        withConfig(input(), (j) => (j.representations[0][4] = 8)),
        BASE,
      ),
      'pyreft_dimension_mismatch',
    );
  });

  it('refuses unsupported representation fields', async () => {
    const cases: Array<[(rep: unknown[]) => void, string]> = [
      // the field under config.json.representations.0
      [(r) => (r[1] = 'mlp_output'), '.component'],
      [(r) => (r[1] = 'model.layers[2].mlp.output'), '.component'],
      [(r) => (r[2] = 'tok'), '.unit'],
      [(r) => (r[3] = 2), '.max_number_of_units'],
      [(r) => (r[7] = [[0, 1]]), '.subspace_partition'],
      [(r) => (r[9] = 'link'), '.intervention_link_key'],
      [(r) => r.splice(10), ''],
      [(r) => (r[0] = 5), '.layer'],
    ];
    for (const [edit, field] of cases)
      await refused(
        importPyreft(
          withConfig(input(), (j) => edit(j.representations[0])),
          BASE,
        ),
        'pyreft_config_invalid',
        `config.json.representations.0${field}`,
      );
  });

  it('accepts a module-path component and ignores representation[0] then', async () => {
    const i = withConfig(input(), (j) => {
      j.representations[1][1] = 'base_model.model.model.layers[4].output';
      j.representations[1][0] = 0;
    });
    const result = await importPyreft(i, BASE);
    expect(result.config.interventions.map((iv) => iv.layer)).toEqual([1, 4]);
  });

  it('refuses share_weights=false with fN+lN and an odd number of interventions', async () => {
    await refused(importPyreft({ ...readInput('consreft_f32'), shareWeights: false }, BASE), 'pyreft_share_weights_odd');
  });

  it('refuses sorted_keys that would be a path', async () => {
    await refused(
      importPyreft(
        withConfig(input(), (j) => (j.sorted_keys[0] = '../../etc/passwd')),
        BASE,
      ),
      'pyreft_config_invalid',
    );
  });

  it('refuses an artifact invalid for the base model', async () => {
    await refused(importPyreft(input(), { ...BASE, hiddenSize: 32 }), 'pyreft_dimension_mismatch');
  });
});
