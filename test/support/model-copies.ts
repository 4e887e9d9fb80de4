import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { ReftError } from '../../src/errors.ts';
import { loadModel } from '../../src/model/load.ts';
import { fixtureArtifact } from './artifacts.ts';
import { STORIES, inferenceCases } from './fixtures.ts';

/** A writable copy of stories260k in a temp folder, to break on purpose. */
export function copyOfStories(): string {
  const dir = mkdtempSync(join(tmpdir(), 'reft-model-'));
  for (const f of readdirSync(STORIES)) copyFileSync(join(STORIES, f), join(dir, f));
  return dir;
}

/** A copy of stories260k with a chat template (stories260k has none). */
export function storiesWithChatTemplate(): string {
  const model = copyOfStories();
  const tc = JSON.parse(readFileSync(join(model, 'tokenizer_config.json'), 'utf8'));
  tc.chat_template =
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
  writeFileSync(join(model, 'tokenizer_config.json'), JSON.stringify(tc));
  return model;
}

/** A shared-interventions folder holding `house-style` (the second fixture case's artifact). */
export function sharedInterventionsFolder(): string {
  const dir = mkdtempSync(join(tmpdir(), 'reft-shared-'));
  const files = fixtureArtifact(inferenceCases()[1]);
  mkdirSync(join(dir, 'house-style'));
  writeFileSync(join(dir, 'house-style', 'reft_config.json'), files.config);
  writeFileSync(join(dir, 'house-style', 'reft_weights.safetensors'), files.weights);
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

/** The typed error loading `dir` fails with (the test fails if it loads). */
export async function loadError(dir: string): Promise<ReftError> {
  const err = await loadModel(dir).then(
    () => null,
    (e) => e,
  );
  expect(err).toBeInstanceOf(ReftError);
  return err as ReftError;
}
