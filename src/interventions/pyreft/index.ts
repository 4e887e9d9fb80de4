/**
 * Importer for interventions saved by pyreft (`ReftModel.save`: config.json + intkey_*.bin, the
 * latter PyTorch zip-pickles read without running pickle). See fixtures/pyreft/README.md.
 */
export { IMPORT_PYREFT, importPyreft, type PyreftImportInput, type PyreftBaseModel, type PyreftImportResult } from './convert.ts';
export { importPyreftDirectory, type PyreftDirectoryOptions } from './directory.ts';
export { readStateDict } from './state-dict.ts';
export type { TorchTensor, TorchDType } from './tensor.ts';
