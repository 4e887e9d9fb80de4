import { existsSync } from 'node:fs';
import { join } from 'node:path';
import fastifyStatic from '@fastify/static';
import type { FastifyInstance, FastifyReply } from 'fastify';

/**
 * The web playground (web/, built by Vite into dist/web on `npm ci`'s prepare step): static
 * files at /ui/* and its page at /, open without a key (a browser can't send a Bearer header for
 * a page load; the page asks for a key and sends it on its API calls). Everything it serves
 * carries a content security policy that allows only this origin: no inline script or style, no
 * CDN, no framing.
 */
export const WEB_UI_DIR = join(import.meta.dirname, '..', '..', 'dist', 'web');

export const WEB_UI_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "font-src 'self'",
  "connect-src 'self'",
  "manifest-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join('; ');

const SAFE_HEADERS: Record<string, string> = {
  'content-security-policy': WEB_UI_CSP,
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-resource-policy': 'same-origin',
};

/** Vite names built assets by content hash, so they never change under one name. */
function cacheHeaders(reply: FastifyReply, path: string): void {
  reply.header('cache-control', path.includes('/assets/') ? 'public, max-age=31536000, immutable' : 'no-cache');
}

export async function webUiRoutes(app: FastifyInstance, root = WEB_UI_DIR): Promise<void> {
  if (!existsSync(join(root, 'index.html'))) {
    app.log.warn({ root }, 'web playground not built (npm run build:web); / and /ui/ are not served');
    return;
  }
  await app.register(async (ui) => {
    ui.addHook('onRoute', (route) => {
      route.config = { ...(route.config ?? {}), auth: 'none' };
    });
    ui.addHook('onSend', async (_request, reply, payload) => {
      for (const [k, v] of Object.entries(SAFE_HEADERS)) reply.header(k, v);
      return payload;
    });
    await ui.register(fastifyStatic, {
      root,
      prefix: '/ui/',
      index: 'index.html',
      setHeaders: cacheHeaders,
      cacheControl: false,
    });
    ui.get('/', { schema: { hide: true } }, (_request, reply) => {
      cacheHeaders(reply, '/index.html');
      return reply.sendFile('index.html');
    });
  });
}
