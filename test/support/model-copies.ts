import { copyFileSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { STORIES } from './fixtures.ts';

/** A writable copy of stories260k in a temp folder, to break on purpose. */
export function copyOfStories(): string {
  const dir = mkdtempSync(join(tmpdir(), 'reft-model-'));
  for (const f of readdirSync(STORIES)) copyFileSync(join(STORIES, f), join(dir, f));
  return dir;
}

/** Rewrites the safetensors header of `dir`'s model.safetensors through `edit`, keeping the data. */
export function editHeader(dir: string, edit: (header: Record<string, any>) => void): void {
  const path = join(dir, 'model.safetensors');
  const bytes = readFileSync(path);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  edit(header);
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, bytes.subarray(8 + n)]));
}

export function editConfig(dir: string, edit: (config: Record<string, any>) => void): void {
  const path = join(dir, 'config.json');
  const config = JSON.parse(readFileSync(path, 'utf8'));
  edit(config);
  writeFileSync(path, JSON.stringify(config));
}
