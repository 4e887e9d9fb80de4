import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // ORT sessions use both cores; running test files one at a time keeps timings sane.
    fileParallelism: false,
    pool: 'forks',
  },
});
