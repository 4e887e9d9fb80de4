/**
 * The layering of src/ (README.md, Architecture), checked by `npm test` (`npm run layering`).
 *
 * LAYERS lists the folders from the bottom up: a module may import its own layer and the layers
 * below it, never one above. Type-only and dynamic imports count like any other
 * (tsPreCompilationDeps), and no import may close a cycle. A new folder under src/ gets a place
 * here before anything imports it.
 */

/** [name, path pattern], lowest first. */
const LAYERS = [
  ['errors', '^src/(errors/|errors[.]ts$)'], // the error catalogue and ReftError
  ['limits', '^src/limits/'],
  ['settings', '^src/settings[.]ts$'],
  ['rng', '^src/rng[.]ts$'],
  ['offload', '^src/offload/'], // a generic worker-thread pool: runs tasks its callers declare
  ['runtime', '^src/runtime/'], // ONNX Runtime sessions and devices
  ['model', '^src/model/'],
  ['prompts', '^src/prompts/'],
  ['grammar', '^src/grammar/'], // structured output: xgrammar's compiler and the rows' matchers
  ['sampling', '^src/sampling/'], // next-token selection: penalties, bias, grammar masks, temperature, top-k/top-p
  ['storage', '^src/storage/'],
  ['quant', '^src/quant/'],
  ['interventions', '^src/interventions/'],
  ['prefix-cache', '^src/prefix-cache/'], // the prefix cache's block keys and books (the blocks are the engine's)
  ['graph', '^src/graph/'],
  ['engine', '^src/engine/'],
  ['training', '^src/training/'],
  ['jobs', '^src/jobs/'],
  ['server', '^src/server/'],
  ['cli', '^src/cli/'],
];

/** A rule per layer (but the top one): it must not import any layer above it. */
const noUpwardImports = LAYERS.slice(0, -1).map(([name, path], i) => ({
  name: `layer-${name}`,
  comment: `${name} must not import ${LAYERS.slice(i + 1)
    .map(([above]) => above)
    .join(', ')}`,
  severity: 'error',
  from: { path },
  to: { path: LAYERS.slice(i + 1).map(([, above]) => above) },
}));

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      comment: 'no module imports itself through others (type-only and dynamic imports included)',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
    ...noUpwardImports,
    {
      name: 'layer-unplaced',
      comment: 'every module of src/ that is imported sits in a layer of .dependency-cruiser.cjs',
      severity: 'error',
      from: {},
      to: { path: '^src/', pathNot: LAYERS.map(([, p]) => p) },
    },
  ],
  options: {
    includeOnly: '^src/',
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    enhancedResolveOptions: { extensions: ['.ts', '.mjs', '.js'] },
  },
};
