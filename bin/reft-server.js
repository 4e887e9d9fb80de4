#!/usr/bin/env node
// The CLI is TypeScript run through tsx's loader; worker threads and child processes
// re-register it (see EngineClient and the training worker's spawn).
import { register } from 'tsx/esm/api';

register();
// A worker started by a server (over an IPC channel) exits with it even while it is still
// loading; once running, the worker replaces this with a graceful stop (src/cli/worker.ts).
if (process.send) {
  process.channel.unref();
  process.once('disconnect', () => process.exit(0));
}
await import('../src/cli/main.ts');
