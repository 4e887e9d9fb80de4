import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

/**
 * The web playground: built into dist/web (npm ci's prepare step runs `npm run build:web`) and
 * served by the server at / and /ui/ (src/server/web-ui.ts). Nothing is loaded from elsewhere at
 * run time, and nothing is inlined, so the page runs under a CSP of 'self' only.
 */
export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  base: '/ui/',
  publicDir: 'public',
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact' },
  build: {
    outDir: fileURLToPath(new URL('../dist/web', import.meta.url)),
    emptyOutDir: true,
    // the polyfill would be an inline script, which the CSP refuses; every browser we aim at has modulepreload
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    sourcemap: false,
    reportCompressedSize: false,
  },
  logLevel: 'warn',
});
