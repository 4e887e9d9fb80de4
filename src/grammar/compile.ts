import { JSON_LAYOUT, type CompileJob } from './spec.ts';
import type { GrammarVocab } from './vocab.ts';
import type { CompiledGrammar, GrammarCompiler, TokenizerInfo } from './xgrammar.ts';
import type * as XGrammar from '@mlc-ai/web-xgrammar';

/** One xgrammar instance's compiler for the model's vocabulary. */
export async function createCompiler(
  xg: typeof XGrammar,
  vocab: GrammarVocab,
): Promise<{ info: TokenizerInfo; compiler: GrammarCompiler }> {
  const info = await xg.TokenizerInfo.createTokenizerInfo(
    vocab.encoded,
    vocab.type,
    vocab.prependSpace,
    vocab.encoded.length,
    vocab.stopTokenIds,
  );
  // xgrammar's own cache is off: the service keeps the compiled grammars, by canonical text
  return { info, compiler: await xg.GrammarCompiler.createGrammarCompiler(info, false) };
}

/** Compiles a job: an EBNF grammar as given, a schema in JSON_LAYOUT with our exact rules put in. */
export async function compileJob(xg: typeof XGrammar, compiler: GrammarCompiler, job: CompileJob): Promise<CompiledGrammar> {
  const { anyWhitespace, indent, separators } = JSON_LAYOUT;
  if (job.kind === 'grammar') return compiler.compileGrammar(job.text, 'root');
  if (!job.rules?.length) return compiler.compileJSONSchema(job.text, anyWhitespace, indent, separators, job.strict);
  // bounded numbers and strings: xgrammar writes the EBNF of the rest, their exact rules go in (exact-rules.ts)
  let ebnf = await xg.Testings._jsonSchemaToEBNF(job.text, anyWhitespace, indent, separators, job.strict);
  for (const { placeholder, expr, defs } of job.rules) {
    if (!ebnf.includes(placeholder)) throw new Error(`internal: no ${placeholder} in the schema's grammar`);
    ebnf = ebnf.split(placeholder).join(expr);
    if (defs) ebnf += `\n${defs}\n`;
  }
  return compiler.compileGrammar(ebnf, 'root');
}
