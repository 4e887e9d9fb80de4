#!/usr/bin/env node
// The CLI is TypeScript run through tsx's loader; worker threads and child processes
// re-register it (see EngineClient and the training worker's spawn).
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
