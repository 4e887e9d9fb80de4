import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { openapiDocument } from '../server/openapi.ts';
import { openSqliteStore } from '../storage/sqlite-store.ts';

/** `reft-server openapi [--out FILE]`: the API description, generated from the route schemas. */
export async function generateOpenapi(): Promise<string> {
  // The routes need a store to be built, never to be described: a throwaway one will do.
  const dir = await mkdtemp(join(tmpdir(), 'reft-openapi-'));
  const store = await openSqliteStore(dir);
  try {
    return await openapiDocument(store);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

export function openapiCommand(): Command {
  return new Command('openapi')
    .description('print the OpenAPI document (or write it with --out)')
    .option('--out <file>', 'write to this file instead of stdout')
    .action(async (flags: { out?: string }) => {
      const doc = await generateOpenapi();
      if (flags.out) await writeFile(flags.out, doc);
      else process.stdout.write(doc);
    });
}
