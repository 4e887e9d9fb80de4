// engine.ts, device-engine.ts, device-kv-cache.ts and protocol.ts still import this path; the engine rewrite imports src/runtime/ directly and deletes this file.
export { createSession, type Device, type SessionOptions } from '../runtime/session.ts';
