import { readFileSync } from 'node:fs';
import Module, { createRequire } from 'node:module';
import { dirname } from 'node:path';
import type * as XGrammar from '@mlc-ai/web-xgrammar';

export type { CompiledGrammar, GrammarCompiler, GrammarMatcher, TokenizerInfo } from '@mlc-ai/web-xgrammar';

/**
 * Loads `@mlc-ai/web-xgrammar` (xgrammar's WASM build, embedded in one file). Its bundle is UMD
 * inside a `"type": "module"` package: `import` runs it as ESM, where its Emscripten loader calls
 * `require` and fails ("require is not defined in ES module scope"), and `require()` does the
 * same (Node ≥ 20.19 loads a "type": "module" package's .js as ESM). Run as CommonJS, which its UMD
 * header supports, it works: the file is compiled by Node's CommonJS loader directly (which also
 * gives it the dynamic `import('module')` its loader makes). One instance per thread (its WASM
 * heap is the thread's own).
 */
let loaded: typeof XGrammar | null = null;

interface CommonJsModule {
  filename: string;
  paths: string[];
  exports: unknown;
  _compile(source: string, filename: string): void;
}
type CommonJsModuleClass = { new (id: string): CommonJsModule; _nodeModulePaths(dir: string): string[] };

export function loadXGrammar(): typeof XGrammar {
  if (loaded) return loaded;
  const file = createRequire(import.meta.url).resolve('@mlc-ai/web-xgrammar');
  const Cjs = Module as unknown as CommonJsModuleClass;
  const m = new Cjs(file);
  m.filename = file;
  m.paths = Cjs._nodeModulePaths(dirname(file));
  m._compile(readFileSync(file, 'utf8'), file);
  loaded = m.exports as typeof XGrammar;
  return loaded;
}
