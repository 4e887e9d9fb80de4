import { pyreftPickleRefused, pyreftPickleTooLarge } from '../../errors.ts';
import { STORAGE_DTYPES, makeStorage, rebuildTensor, type TorchStorage, type TorchTensor } from './tensor.ts';

/**
 * A restricted reader for the `data.pkl` of `torch.save`. Pickle is a program for a stack machine
 * whose GLOBAL/REDUCE can call anything in Python; here it is read as data. Only an explicit list
 * of opcodes is understood, GLOBAL may only name a few torch/collections objects, and REDUCE may
 * only "call" two of them, both interpreted here (an empty OrderedDict, a tensor view over a zip
 * record). Nothing named in the pickle is ever looked up, imported or run: anything else is
 * refused with an error naming it.
 */

/** The values a state-dict pickle can build. */
export type PickleValue = null | boolean | number | string | PyTuple | PyList | PyDict | PyGlobal | TorchStorage | TorchTensor;

export class PyTuple {
  constructor(readonly items: readonly PickleValue[]) {}
}
export class PyList {
  readonly items: PickleValue[] = [];
}
/** dict and OrderedDict alike; insertion order is kept. Keys are restricted to scalars. */
export class PyDict {
  readonly entries = new Map<string | number | boolean | null, PickleValue>();
}
/** One of the allowed globals, as a name only. */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
  get qualified(): string {
    return `${this.module} ${this.name}`;
  }
}

/** GLOBALs a torch state dict needs; `module name` as pickle writes them. */
const ALLOWED_GLOBALS = new Set([
  'collections OrderedDict',
  'torch._utils _rebuild_tensor_v2',
  ...Object.keys(STORAGE_DTYPES).map((s) => `torch ${s}`),
]);

/**
 * Bounds on what a few-kilobyte state dict needs; a hostile pickle cannot make us allocate more.
 * Every opcode builds at most one value, so the opcode count bounds the values built; marks are
 * counted over all open frames (the stack bound alone counts only the current one).
 */
export const PICKLE_LIMITS = {
  /** Bytes of one data.pkl (a state dict of a few tensors is a few KB). */
  maxBytes: 1024 * 1024,
  maxOpcodes: 20_000,
  /** Items on the stack, all open MARK frames together. */
  maxStack: 10_000,
  /** Open MARKs at once (each nests one container level). */
  maxMarks: 1_000,
  maxMemo: 10_000,
} as const;

/** Elements a pickle's views may declare when the caller does not size them from a model. */
export const DEFAULT_MAX_ELEMENTS = 1 << 22;

/** Opcode byte → name, for every pickle opcode (so refusals can say which one). */
const OPCODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries({
    MARK: '(', STOP: '.', POP: '0', POP_MARK: '1', DUP: '2', FLOAT: 'F', INT: 'I', BININT: 'J', BININT1: 'K',
    LONG: 'L', BININT2: 'M', NONE: 'N', PERSID: 'P', BINPERSID: 'Q', REDUCE: 'R', STRING: 'S', BINSTRING: 'T',
    SHORT_BINSTRING: 'U', UNICODE: 'V', BINUNICODE: 'X', APPEND: 'a', BUILD: 'b', GLOBAL: 'c', DICT: 'd',
    EMPTY_DICT: '}', APPENDS: 'e', GET: 'g', BINGET: 'h', INST: 'i', LONG_BINGET: 'j', LIST: 'l', EMPTY_LIST: ']',
    OBJ: 'o', PUT: 'p', BINPUT: 'q', LONG_BINPUT: 'r', SETITEM: 's', TUPLE: 't', EMPTY_TUPLE: ')', SETITEMS: 'u',
    BINFLOAT: 'G', PROTO: '\x80', NEWOBJ: '\x81', EXT1: '\x82', EXT2: '\x83', EXT4: '\x84', TUPLE1: '\x85',
    TUPLE2: '\x86', TUPLE3: '\x87', NEWTRUE: '\x88', NEWFALSE: '\x89', LONG1: '\x8a', LONG4: '\x8b', BINBYTES: 'B',
    SHORT_BINBYTES: 'C', SHORT_BINUNICODE: '\x8c', BINUNICODE8: '\x8d', BINBYTES8: '\x8e', EMPTY_SET: '\x8f',
    ADDITEMS: '\x90', FROZENSET: '\x91', NEWOBJ_EX: '\x92', STACK_GLOBAL: '\x93', MEMOIZE: '\x94', FRAME: '\x95',
    BYTEARRAY8: '\x96', NEXT_BUFFER: '\x97', READONLY_BUFFER: '\x98',
  }).map(([name, ch]) => [ch.charCodeAt(0), name]),
);

/** What the reader needs from outside: the zip records the persistent ids point to. */
export interface PickleSource {
  /** Names the file in every error. */
  file: string;
  record(name: string): Uint8Array | undefined;
  /** Elements all tensor views together may have (default: DEFAULT_MAX_ELEMENTS). */
  maxElements?: number;
}

/** Reads a state-dict pickle to its value. Throws a ReftError on anything outside the allowlist. */
export function readPickle(bytes: Uint8Array, source: PickleSource): PickleValue {
  if (bytes.byteLength > PICKLE_LIMITS.maxBytes) {
    throw pyreftPickleTooLarge({ file: source.file, bytes: bytes.byteLength, limit: PICKLE_LIMITS.maxBytes }, source.file);
  }
  return new PickleReader(bytes, source).run();
}

/** The mark stack entry: where a MARK split the stack. */
type Frame = PickleValue[];

class PickleReader {
  private pos = 0;
  private stack: Frame = [];
  private readonly marks: Frame[] = [];
  private readonly memo = new Map<number, PickleValue>();
  private readonly storages = new Map<string, TorchStorage>();
  private readonly view: DataView;
  private opcodes = 0;
  /** Items held in the current frame and every frame under an open MARK. */
  private held = 0;
  private elements = 0;

  constructor(
    private readonly bytes: Uint8Array,
    private readonly source: PickleSource,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  run(): PickleValue {
    for (;;) {
      const at = this.pos;
      const op = this.u8();
      if (op === 0x2e /* STOP */) return this.finish();
      if (++this.opcodes > PICKLE_LIMITS.maxOpcodes) throw this.fail(`pickle runs more than ${PICKLE_LIMITS.maxOpcodes} opcodes (the pickle opcode limit)`);
      if (!this.step(op)) throw this.fail(`forbidden pickle opcode ${OPCODE_NAMES[op] ?? 'unknown'} (0x${op.toString(16).padStart(2, '0')}) at byte ${at}`);
      if (this.held + this.stack.length > PICKLE_LIMITS.maxStack) throw this.fail(`pickle stack exceeds ${PICKLE_LIMITS.maxStack} items across its MARK frames (the pickle stack limit)`);
    }
  }

  private finish(): PickleValue {
    if (this.stack.length !== 1 || this.marks.length !== 0) throw this.fail('pickle ends with a malformed stack');
    return this.stack[0];
  }

  /** Executes one allowed opcode; false when the opcode is not on the allowlist. */
  private step(op: number): boolean {
    switch (op) {
      case 0x80: return this.proto(); // PROTO
      case 0x95: this.take(8); return true; // FRAME: framing hint only
      case 0x63: return this.global(); // GLOBAL
      case 0x93: return this.stackGlobal(); // STACK_GLOBAL (always refused, naming the global)
      case 0x71: return this.put(this.u8()); // BINPUT
      case 0x72: return this.put(this.u32()); // LONG_BINPUT
      case 0x94: return this.put(this.memo.size); // MEMOIZE
      case 0x68: return this.get(this.u8()); // BINGET
      case 0x6a: return this.get(this.u32()); // LONG_BINGET
      case 0x28: return this.mark(); // MARK
      case 0x29: return this.push(new PyTuple([])); // EMPTY_TUPLE
      case 0x74: return this.push(new PyTuple(this.popMark())); // TUPLE
      case 0x85: return this.push(new PyTuple(this.popN(1))); // TUPLE1
      case 0x86: return this.push(new PyTuple(this.popN(2))); // TUPLE2
      case 0x87: return this.push(new PyTuple(this.popN(3))); // TUPLE3
      case 0x5d: return this.push(new PyList()); // EMPTY_LIST
      case 0x61: return this.append(this.popN(1)); // APPEND
      case 0x65: return this.append(this.popMark()); // APPENDS
      case 0x7d: return this.push(new PyDict()); // EMPTY_DICT
      case 0x73: return this.setItems(this.popN(2)); // SETITEM
      case 0x75: return this.setItems(this.popMark()); // SETITEMS
      case 0x58: return this.push(this.text(this.u32())); // BINUNICODE
      case 0x8c: return this.push(this.text(this.u8())); // SHORT_BINUNICODE
      case 0x8d: return this.push(this.text(this.u64())); // BINUNICODE8
      case 0x4b: return this.push(this.u8()); // BININT1
      case 0x4d: return this.push(this.u16()); // BININT2
      case 0x4a: return this.push(this.i32()); // BININT
      case 0x8a: return this.push(this.long1()); // LONG1
      case 0x47: return this.push(this.f64be()); // BINFLOAT
      case 0x4e: return this.push(null); // NONE
      case 0x88: return this.push(true); // NEWTRUE
      case 0x89: return this.push(false); // NEWFALSE
      case 0x51: return this.push(this.persistentLoad(this.pop())); // BINPERSID
      case 0x52: return this.reduce(); // REDUCE
      case 0x62: return this.build(); // BUILD
      default: return false;
    }
  }

  // --- globals and calls -------------------------------------------------------------------

  private proto(): boolean {
    const version = this.u8();
    if (version < 2 || version > 5) throw this.fail(`unsupported pickle protocol ${version}`);
    return true;
  }

  /** GLOBAL "module\nname\n": only names from the allowlist become values. */
  private global(): boolean {
    const module = this.line();
    const name = this.line();
    const qualified = `${module} ${name}`;
    if (!ALLOWED_GLOBALS.has(qualified)) throw this.fail(`forbidden pickle global ${JSON.stringify(qualified)}`);
    return this.push(new PyGlobal(module, name));
  }

  /** torch.save never writes STACK_GLOBAL; refuse it, naming what it would have imported. */
  private stackGlobal(): boolean {
    const [module, name] = this.stack.slice(-2);
    const what = typeof module === 'string' && typeof name === 'string' ? `${module} ${name}` : 'a computed name';
    throw this.fail(`forbidden pickle opcode STACK_GLOBAL (global ${JSON.stringify(what)})`);
  }

  /** REDUCE: the callable must be one of the two interpreted here. */
  private reduce(): boolean {
    const args = this.pop();
    const callable = this.pop();
    if (!(callable instanceof PyGlobal)) throw this.fail('pickle REDUCE on something that is not an allowed global');
    if (!(args instanceof PyTuple)) throw this.fail(`pickle REDUCE of ${callable.qualified} without an argument tuple`);
    if (callable.qualified === 'collections OrderedDict') return this.push(this.orderedDict(args));
    if (callable.qualified === 'torch._utils _rebuild_tensor_v2') return this.push(this.tensor(args));
    throw this.fail(`forbidden pickle callable ${JSON.stringify(callable.qualified)} under REDUCE`);
  }

  private orderedDict(args: PyTuple): PyDict {
    if (args.items.length !== 0) throw this.fail('OrderedDict is only allowed with no arguments');
    return new PyDict();
  }

  /** `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])`. */
  private tensor(args: PyTuple): TorchTensor {
    const [storage, offset, size, stride, requiresGrad, hooks, metadata] = args.items;
    if (args.items.length < 6 || args.items.length > 7) throw this.fail(`_rebuild_tensor_v2 takes 6 arguments, got ${args.items.length}`);
    if (!isStorage(storage)) throw this.fail('_rebuild_tensor_v2: first argument is not a storage');
    if (typeof requiresGrad !== 'boolean') throw this.fail('_rebuild_tensor_v2: requires_grad is not a bool');
    if (!isEmptyDict(hooks)) throw this.fail('_rebuild_tensor_v2: backward hooks are not allowed');
    if (metadata !== undefined && metadata !== null && !isEmptyDict(metadata)) throw this.fail('_rebuild_tensor_v2: tensor metadata is not allowed');
    const shape = this.counts(size, 'size');
    // counted before anything is allocated: the views' declared sizes, not their storages', are what a copy costs
    this.elements += shape.reduce((a, b) => a * b, 1);
    const max = this.source.maxElements ?? DEFAULT_MAX_ELEMENTS;
    if (this.elements > max) {
      throw this.fail(`tensors declare more than ${max} elements in all (the tensor element limit for this model's hidden size)`);
    }
    return rebuildTensor(storage, this.count(offset, 'storage offset'), shape, this.counts(stride, 'stride'), this.source.file);
  }

  /** BINPERSID: `('storage', <storage class>, key, location, numel)` → the `data/<key>` record. */
  private persistentLoad(pid: PickleValue): TorchStorage {
    const [tag, cls, key, location, numel] = pid instanceof PyTuple && pid.items.length === 5 ? pid.items : [];
    if (tag !== 'storage') throw this.fail('persistent id is not a (\'storage\', class, key, location, numel) tuple');
    if (!(cls instanceof PyGlobal) || cls.module !== 'torch' || !(cls.name in STORAGE_DTYPES)) throw this.fail('persistent id does not name an allowed storage class');
    if (typeof key !== 'string' || typeof location !== 'string') throw this.fail('persistent id key and location must be strings');
    const dtype = STORAGE_DTYPES[cls.name];
    const n = this.count(numel, 'storage size');
    const known = this.storages.get(key);
    if (known) {
      if (known.dtype !== dtype || known.numel !== n) throw this.fail(`storage "${key}" is declared twice with different types or sizes`);
      return known;
    }
    const storage = makeStorage(dtype, key, n, this.source.record(`data/${key}`), this.source.file);
    this.storages.set(key, storage);
    return storage;
  }

  /** BUILD sets `_metadata` on the state dict (nn.Module.state_dict); it carries nothing we use. */
  private build(): boolean {
    const state = this.pop();
    const target = this.stack[this.stack.length - 1];
    const onlyMetadata = state instanceof PyDict && [...state.entries.keys()].every((k) => k === '_metadata');
    if (!(target instanceof PyDict) || !onlyMetadata) throw this.fail('pickle BUILD is only allowed to set a state dict\'s _metadata');
    return true;
  }

  // --- containers ----------------------------------------------------------------------------

  private append(items: PickleValue[]): boolean {
    const list = this.stack[this.stack.length - 1];
    if (!(list instanceof PyList)) throw this.fail('pickle APPEND to something that is not a list');
    list.items.push(...items);
    return true;
  }

  private setItems(items: PickleValue[]): boolean {
    const dict = this.stack[this.stack.length - 1];
    if (!(dict instanceof PyDict)) throw this.fail('pickle SETITEM on something that is not a dict');
    if (items.length % 2 !== 0) throw this.fail('pickle SETITEMS with an odd number of items');
    for (let i = 0; i < items.length; i += 2) {
      const key = items[i];
      if (key !== null && typeof key === 'object') throw this.fail('pickle dict key is not a string, number or bool');
      dict.entries.set(key, items[i + 1]);
    }
    return true;
  }

  // --- stack and memo ------------------------------------------------------------------------

  private push(v: PickleValue): boolean {
    this.stack.push(v);
    return true;
  }

  private pop(): PickleValue {
    if (this.stack.length === 0) throw this.fail('pickle stack underflow');
    return this.stack.pop() as PickleValue;
  }

  private popN(n: number): PickleValue[] {
    if (this.stack.length < n) throw this.fail('pickle stack underflow');
    return this.stack.splice(this.stack.length - n, n);
  }

  private mark(): boolean {
    if (this.marks.length >= PICKLE_LIMITS.maxMarks) throw this.fail(`pickle opens more than ${PICKLE_LIMITS.maxMarks} MARKs at once (the pickle mark limit)`);
    this.marks.push(this.stack);
    this.held += this.stack.length;
    this.stack = [];
    return true;
  }

  private popMark(): PickleValue[] {
    const below = this.marks.pop();
    if (below === undefined) throw this.fail('pickle has no MARK to pop to');
    const items = this.stack;
    this.stack = below;
    this.held -= below.length;
    return items;
  }

  private put(index: number): boolean {
    if (this.stack.length === 0) throw this.fail('pickle memoizes an empty stack');
    if (this.memo.size >= PICKLE_LIMITS.maxMemo && !this.memo.has(index)) throw this.fail(`pickle memo exceeds ${PICKLE_LIMITS.maxMemo} entries (the pickle memo limit)`);
    this.memo.set(index, this.stack[this.stack.length - 1]);
    return true;
  }

  private get(index: number): boolean {
    if (!this.memo.has(index)) throw this.fail(`pickle reads memo ${index} before it is set`);
    return this.push(this.memo.get(index) as PickleValue);
  }

  // --- argument checks -----------------------------------------------------------------------

  private count(v: PickleValue | undefined, what: string): number {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw this.fail(`_rebuild_tensor_v2: ${what} is not a non-negative integer`);
    return v;
  }

  private counts(v: PickleValue | undefined, what: string): number[] {
    if (!(v instanceof PyTuple)) throw this.fail(`_rebuild_tensor_v2: ${what} is not a tuple`);
    return v.items.map((x) => this.count(x, what));
  }

  // --- raw reads -----------------------------------------------------------------------------

  private take(n: number): Uint8Array {
    if (n > this.bytes.byteLength - this.pos) throw this.fail(`pickle is truncated at byte ${this.pos}`);
    const out = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  private u8(): number {
    return this.take(1)[0];
  }
  private u16(): number {
    const at = this.pos;
    this.take(2);
    return this.view.getUint16(at, true);
  }
  private u32(): number {
    const at = this.pos;
    this.take(4);
    return this.view.getUint32(at, true);
  }
  private i32(): number {
    const at = this.pos;
    this.take(4);
    return this.view.getInt32(at, true);
  }
  private u64(): number {
    const at = this.pos;
    this.take(8);
    const v = this.view.getBigUint64(at, true);
    if (v > BigInt(this.bytes.byteLength)) throw this.fail(`pickle is truncated at byte ${at}`);
    return Number(v);
  }
  private f64be(): number {
    const at = this.pos;
    this.take(8);
    return this.view.getFloat64(at, false);
  }

  /** LONG1: a little-endian two's-complement integer of n ≤ 8 bytes, kept only if it is safe. */
  private long1(): number {
    const n = this.u8();
    if (n > 8) throw this.fail(`pickle LONG1 of ${n} bytes is out of range`);
    const raw = this.take(n);
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(raw[i]);
    if (n > 0 && raw[n - 1] & 0x80) v -= 1n << BigInt(8 * n);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) throw this.fail(`pickle integer ${v} is out of range`);
    return Number(v);
  }

  private text(n: number): string {
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(this.take(n));
    } catch (e) {
      if (e instanceof TypeError) throw this.fail('pickle string is not valid UTF-8');
      throw e;
    }
  }

  /** A newline-terminated ASCII argument (GLOBAL's module and name). */
  private line(): string {
    const end = this.bytes.indexOf(0x0a, this.pos);
    if (end < 0 || end - this.pos > 256) throw this.fail(`pickle GLOBAL at byte ${this.pos} is malformed`);
    const s = Buffer.from(this.take(end - this.pos)).toString('latin1');
    this.pos++; // the newline
    return s;
  }

  private fail(message: string) {
    return pyreftPickleRefused({ file: this.source.file, problem: message }, this.source.file);
  }
}

function isStorage(v: PickleValue | undefined): v is TorchStorage {
  return typeof v === 'object' && v !== null && 'numel' in v && 'key' in v;
}

function isEmptyDict(v: PickleValue | undefined): boolean {
  return v instanceof PyDict && v.entries.size === 0;
}
