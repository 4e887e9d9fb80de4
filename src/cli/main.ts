import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command } from 'commander';
import { ReftError } from '../errors.ts';
import { generateCommand } from './generate.ts';
import { importPyreftCommand } from './import-pyreft.ts';
import { openapiCommand } from './openapi.ts';
import { serveCommand } from './serve.ts';
import { setupCudaCommand } from './setup-cuda.ts';
import { trainCommand } from './train.ts';
import { workerCommand } from './worker.ts';

// Libraries' chatter (@huggingface/hub announces each download with console.debug) belongs on
// stderr: stdout carries only what a command outputs (a continuation, JSON logs).
console.debug = console.error;

const { version } = JSON.parse(readFileSync(join(import.meta.dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };

const program = new Command('reft-server')
  .description('Serve and train ReFT interventions on a frozen language model')
  .version(version, '-V, --version', 'print the version')
  .showHelpAfterError();

program.addCommand(serveCommand());
program.addCommand(workerCommand());
program.addCommand(generateCommand());
program.addCommand(trainCommand());
program.addCommand(importPyreftCommand());
program.addCommand(openapiCommand());
program.addCommand(setupCudaCommand());

try {
  await program.parseAsync(process.argv);
} catch (e) {
  // Errors users can act on are one line on stderr; anything else keeps its stack.
  if (e instanceof ReftError) {
    process.stderr.write(`reft-server: ${e.message}\n`);
    process.exitCode = 1;
  } else {
    throw e;
  }
}
