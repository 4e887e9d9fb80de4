import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type Browser, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FIXTURES } from './support/fixtures.ts';
import { json, upload, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';
import { NEW_SENTENCE, TRAIN_OPENINGS } from './support/training-data.ts';

/**
 * Issue 17: the web playground, driven in Debian's Chromium against a real server process on
 * stories260k. Screenshots of each page (1280×800) go to test-results/playground/ (not committed).
 */
const ROOT = join(import.meta.dirname, '..');
const SHOTS = join(ROOT, 'test-results', 'playground');
const ARTIFACTS = join(FIXTURES, 'steer', 'artifacts');
const artifactFiles = (name: string) => ({
  config: readFileSync(join(ARTIFACTS, name, 'reft_config.json'), 'utf8'),
  weights: new Uint8Array(readFileSync(join(ARTIFACTS, name, 'reft_weights.safetensors'))),
});

/** Settings the page and the API both get: sampled, so the seed is what makes the two sides comparable. */
const PROMPT = 'Once upon a time';
const SAMPLING = { max_new_tokens: 20, temperature: 0.8, top_p: 1, top_k: 0, seed: 7 };

let browser: Browser;

beforeAll(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});
afterAll(async () => {
  await browser?.close();
});

interface Tab {
  page: Page;
  context: BrowserContext;
  /** Page errors, CSP violations, and requests that left the server's origin. */
  problems: string[];
}

async function openTab(url: string): Promise<Tab> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/.test(m.text())) problems.push(`CSP: ${m.text()}`);
  });
  page.on('request', (r) => {
    if (!r.url().startsWith(url) && !r.url().startsWith('blob:')) problems.push(`offsite request: ${r.url()}`);
  });
  await page.goto(url + '/');
  return { page, context, problems };
}

async function shoot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: join(SHOTS, `${name}.png`) });
}

/** Fills the generate form with the shared settings. */
async function fillGenerate(page: Page, prompt = PROMPT, s = SAMPLING): Promise<void> {
  await page.getByLabel('Prompt', { exact: true }).fill(prompt);
  await page.getByLabel('Max new tokens').fill(String(s.max_new_tokens));
  await page.getByLabel('Temperature (0 = greedy)').fill(String(s.temperature));
  await page.getByLabel('Top p').fill(String(s.top_p));
  await page.getByLabel('Top k (0 = off)').fill(String(s.top_k));
  await page.getByLabel('Seed (both sides)').fill(String(s.seed));
}

/** Clicks a button that starts a generation; resolves with the run's number. */
async function startRun(page: Page, button: 'Compare' | 'Generate'): Promise<number> {
  const before = Number(await page.getByTestId('state-steered').getAttribute('data-run'));
  await page.getByRole('button', { name: button, exact: true }).click();
  return before + 1;
}

async function paneText(page: Page, pane: 'base' | 'steered', run: number): Promise<string> {
  await page.locator(`[data-testid=state-${pane}][data-state=done][data-run="${run}"]`).waitFor({ timeout: 30_000 });
  return page.getByTestId(`text-${pane}`).innerText();
}

describe('the web playground, single-tenant', () => {
  let server: ServerProcess;
  let api: Api;
  let tab: Tab;

  beforeAll(async () => {
    // a shared intervention, as an operator places one
    const shared = mkdtempSync(join(tmpdir(), 'reft-shared-'));
    cpSync(join(ARTIFACTS, 'gamma'), join(shared, 'gamma'), { recursive: true });
    server = await startServerProcess({ args: ['--poll-ms', '100', '--usage-flush-ms', '200', '--interventions-dir', shared] });
    api = { url: server.url };
    expect((await upload(api, artifactFiles('alpha'), { name: 'alpha' })).status).toBe(201);
    tab = await openTab(server.url);
  });
  afterAll(async () => {
    await tab?.context.close();
    expect(await server.stop()).toBe(0);
  });

  it('is served at / and /ui/ under a CSP of its own origin only; /docs and the API keep their headers', async () => {
    for (const path of ['/', '/ui/']) {
      const res = await fetch(server.url + path);
      expect(res.status, path).toBe(200);
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      const csp = res.headers.get('content-security-policy')!;
      expect(csp).toContain("default-src 'none'");
      expect(csp).toContain("script-src 'self'");
      expect(csp).toContain("connect-src 'self'");
      expect(csp).not.toMatch(/unsafe-inline|unsafe-eval|https?:|\*/);
      expect(res.headers.get('x-content-type-options')).toBe('nosniff');
      const html = await res.text();
      // every script and stylesheet comes from this origin, none inline
      expect(html).not.toMatch(/<script(?![^>]*\bsrc="\/ui\/)/);
      expect(html).not.toMatch(/<style|https?:\/\//);
      const script = /src="(\/ui\/assets\/[^"]+\.js)"/.exec(html)![1];
      const js = await fetch(server.url + script);
      expect(js.status).toBe(200);
      expect(js.headers.get('content-security-policy')).toBe(csp);
      expect(js.headers.get('cache-control')).toContain('immutable');
    }
    expect((await fetch(`${server.url}/ui/missing.js`)).status).toBe(404);
    const docs = await fetch(`${server.url}/docs/`);
    expect(docs.status).toBe(200);
    expect(docs.headers.get('content-security-policy') ?? '').not.toContain("default-src 'none'");
    const health = await fetch(`${server.url}/healthz`);
    expect(health.headers.get('content-security-policy')).toBeNull();
  });

  it("shows each side's prompt tokens and how many came from the prefix cache, as the API counts them", async () => {
    const { page } = tab;
    const story = `${PROMPT}, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. One day, they saw a big red ball under a tree. Lily ran to get it, but Max was faster. They played all day until the sun went down, and then they went home to eat dinner with Mom and Dad. After dinner, Lily told Mom about the ball.`;
    await page.goto(`${server.url}/#/generate`);
    await fillGenerate(page, story);
    await page.getByLabel('Intervention 1', { exact: true }).selectOption('alpha');
    const first = await startRun(page, 'Compare');
    await paneText(page, 'base', first);
    const second = await startRun(page, 'Compare');
    await paneText(page, 'base', second);
    const note = await page.getByTestId('state-base').innerText();
    const api2 = await json(api, 'POST', '/v1/generate', { prompt: story, ...SAMPLING });
    const { prompt_tokens, prompt_tokens_details } = api2.body.usage;
    expect(prompt_tokens_details.cached_tokens).toBeGreaterThan(0);
    expect(note).toContain(`prompt ${prompt_tokens} tokens, ${prompt_tokens_details.cached_tokens} cached`);
  });

  it('compares a prompt with and without an intervention, side by side, as /v1/generate answers with the same seed', async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/generate`);
    await fillGenerate(page);
    await page.getByLabel('Intervention 1', { exact: true }).selectOption('alpha');
    const run = await startRun(page, 'Compare');
    const [base, steered] = [await paneText(page, 'base', run), await paneText(page, 'steered', run)];
    const apiBase = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, ...SAMPLING });
    const apiSteered = await json(api, 'POST', '/v1/generate', { prompt: PROMPT, adapter: 'alpha', ...SAMPLING });
    expect(apiBase.status).toBe(200);
    expect(base).toBe(apiBase.body.text);
    expect(steered).toBe(apiSteered.body.text);
    expect(steered).not.toBe(base);
    expect(base.length).toBeGreaterThan(0);

    // the heat strip: ‖c(h)‖ of each applied intervention at each position it edited, as the API reports c(h)
    const readout = await json(api, 'POST', '/v1/generate', {
      prompt: PROMPT,
      ...SAMPLING,
      interventions: [{ intervention: 'alpha' }],
      return_coefficients: true,
    });
    const edits: Array<{ layer: number; positions: number[]; coefficients: number[][] }> = readout.body.applied[0];
    expect(edits.length).toBe(2);
    const strip = page.getByTestId('heat-strip');
    await strip.waitFor();
    const rows = strip.locator('tbody tr');
    expect(await rows.count()).toBe(edits.length);
    for (const [i, edit] of edits.entries()) {
      const cells = await rows.nth(i).locator('td').allInnerTexts();
      expect(await rows.nth(i).locator('th').innerText()).toBe(`alpha · layer ${edit.layer}`);
      const shown = edit.positions.map((p) => cells[p]);
      expect(shown).toEqual(edit.coefficients.map((c) => Math.hypot(...c).toFixed(2)));
      expect(cells.filter((c) => c === '–').length).toBe(cells.length - edit.positions.length);
    }
    const header = await strip.locator('thead th.token').allInnerTexts();
    expect(header.length).toBe(readout.body.prompt_token_texts.length);
    await shoot(page, 'generate');
    expect(tab.problems).toEqual([]);
  });

  it('a strength slider at 0 shows the base text on both sides; at 2, what the API gives at strength 2', async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/generate`);
    await fillGenerate(page);
    await page.getByLabel('Intervention 1', { exact: true }).selectOption('alpha');
    const slider = page.getByRole('slider', { name: /^Strength/ });
    await slider.fill('0');
    expect(await page.locator('output').first().innerText()).toBe('0.0');
    const run = await startRun(page, 'Compare');
    const base = (await json(api, 'POST', '/v1/generate', { prompt: PROMPT, ...SAMPLING })).body.text;
    expect(await paneText(page, 'base', run)).toBe(base);
    expect(await paneText(page, 'steered', run)).toBe(base);

    await slider.fill('2');
    const again = await startRun(page, 'Compare');
    const doubled = await json(api, 'POST', '/v1/generate', {
      prompt: PROMPT,
      ...SAMPLING,
      interventions: [{ intervention: 'alpha', strength: 2 }],
    });
    expect(doubled.status).toBe(200);
    expect(await paneText(page, 'steered', again)).toBe(doubled.body.text);
    expect(doubled.body.text).not.toBe(base);
    expect(tab.problems).toEqual([]);
  });

  it('uploads an artifact by the file input, lists it, deletes it; a bad upload shows the server message next to its field', async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/interventions`);
    const dir = join(ARTIFACTS, 'beta');
    await page.getByLabel('reft_config.json', { exact: true }).setInputFiles(join(dir, 'reft_config.json'));
    await page.getByLabel('reft_weights.safetensors', { exact: true }).setInputFiles(join(dir, 'reft_weights.safetensors'));
    await page.getByLabel('Name (optional').fill('beta-upload');
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    const row = page.locator('tr[data-name="beta-upload"]');
    await row.waitFor();
    await expect.poll(() => row.innerText()).toMatch(/yours\s+direft\s+3\s+2\s+l3/);
    expect(await page.getByTestId('iv-status').innerText()).toContain('Stored beta-upload (version 1)');
    expect((await json(api, 'GET', '/v1/interventions/beta-upload')).status).toBe(200);
    // the shared one is listed as such, with no way to delete or replace it
    const shared = page.locator('tr[data-name="gamma"]');
    expect(await shared.locator('td').nth(0).innerText()).toBe('shared (read-only)');
    expect(await shared.getByRole('button').allInnerTexts()).toEqual(['config', 'weights']);
    expect(await row.getByRole('button').allInnerTexts()).toEqual(['config', 'weights', 'replace', 'delete']);
    await shoot(page, 'interventions');

    // downloads come back byte-identical
    const [saved] = await Promise.all([
      page.waitForEvent('download'),
      row.getByRole('button', { name: "Download beta-upload's weights" }).click(),
    ]);
    expect(saved.suggestedFilename()).toBe('beta-upload.reft_weights.safetensors');
    expect(readFileSync(await saved.path())).toEqual(readFileSync(join(dir, 'reft_weights.safetensors')));

    await row.getByRole('button', { name: 'Delete beta-upload' }).click();
    await row.getByRole('button', { name: 'Confirm delete beta-upload' }).click();
    await row.waitFor({ state: 'detached' });
    expect((await json(api, 'GET', '/v1/interventions/beta-upload')).status).toBe(404);

    // weights of another shape: the server names the tensor, the page puts it beside the weights input
    const bad = { config: artifactFiles('beta').config, weights: artifactFiles('alpha').weights };
    const expected = (await upload(api, bad, { name: 'bad-upload' })).body;
    expect(expected.field).toBeTruthy();
    await page.getByLabel('reft_config.json', { exact: true }).setInputFiles(join(dir, 'reft_config.json'));
    await page.getByLabel('reft_weights.safetensors', { exact: true }).setInputFiles(join(ARTIFACTS, 'alpha', 'reft_weights.safetensors'));
    await page.getByLabel('Name (optional').fill('bad-upload');
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    const error = page.locator('#up-weights-error');
    await error.waitFor();
    expect(await error.innerText()).toContain(expected.detail);
    expect(await page.getByLabel('reft_weights.safetensors', { exact: true }).getAttribute('aria-describedby')).toBe('up-weights-error');
    expect(await page.getByLabel('reft_weights.safetensors', { exact: true }).getAttribute('aria-invalid')).toBe('true');
    expect(tab.problems).toEqual([]);
  });

  it("takes a dropped pyreft folder's files and imports them as the API does; a row's replace stores version 2", async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/interventions`);
    // what a dropped folder yields once its entries are read: the folder's files
    const folder = join(FIXTURES, 'pyreft', 'loreft_bf16');
    const names = readdirSync(folder).filter((n) => n === 'config.json' || n.startsWith('intkey_'));
    const files = names.map((n) => ({ name: n, base64: readFileSync(join(folder, n)).toString('base64') }));
    const dataTransfer = await page.evaluateHandle((fs) => {
      // the page's DOM types (this file is type-checked without the DOM library)
      const dom = globalThis as unknown as {
        DataTransfer: new () => { items: { add(file: unknown): void } };
        File: new (parts: Uint8Array[], name: string) => unknown;
      };
      const dt = new dom.DataTransfer();
      for (const f of fs) dt.items.add(new dom.File([Uint8Array.from(atob(f.base64), (c) => c.charCodeAt(0))], f.name));
      return dt;
    }, files);
    const form = page.getByRole('form', { name: 'Upload an intervention' });
    await form.dispatchEvent('dragover', { dataTransfer });
    await form.dispatchEvent('drop', { dataTransfer });
    await expect.poll(() => page.getByLabel('pyreft folder').isChecked()).toBe(true);
    const bins = names.filter((n) => n.startsWith('intkey_'));
    expect(await page.getByText(`chosen: ${bins.join(', ')}`).count()).toBe(1);
    await page.getByLabel('Trained with share_weights=True').check();
    await page.getByLabel('Name (optional').fill('dropped-pyreft');
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await page.locator('tr[data-name="dropped-pyreft"]').waitFor();
    expect(await page.getByTestId('iv-status').innerText()).toContain('Stored dropped-pyreft (version 1)');

    // the API's import of the same folder stores the same artifact
    const viaApi = new FormData();
    for (const n of names) viaApi.append(n === 'config.json' ? 'config' : 'files', new Blob([readFileSync(join(folder, n))]), n);
    viaApi.append('positions', 'f1+l1');
    viaApi.append('share_weights', 'true');
    viaApi.append('name', 'api-pyreft');
    const imported = await fetch(`${server.url}/v1/interventions/import/pyreft`, { method: 'POST', body: viaApi });
    expect(imported.status).toBe(201);
    const file = async (name: string, f: string) =>
      Buffer.from(await (await fetch(`${server.url}/v1/interventions/${name}/files/${f}`)).arrayBuffer());
    expect(await file('dropped-pyreft', 'reft_weights.safetensors')).toEqual(await file('api-pyreft', 'reft_weights.safetensors'));
    const config = async (name: string) => {
      const { name: _, ...rest } = JSON.parse((await file(name, 'reft_config.json')).toString());
      return rest;
    };
    expect(await config('dropped-pyreft')).toEqual(await config('api-pyreft'));

    // replace from alpha's row: same name, version + 1
    const alpha = page.locator('tr[data-name="alpha"]');
    await alpha.getByRole('button', { name: 'Replace alpha' }).click();
    expect(await page.getByLabel('reft/v1 artifact').isChecked()).toBe(true);
    expect(await page.getByLabel('Name (optional').inputValue()).toBe('alpha');
    expect(await page.getByLabel('Replace the intervention of this name (version + 1)').isChecked()).toBe(true);
    await page.getByLabel('reft_config.json', { exact: true }).setInputFiles(join(ARTIFACTS, 'alpha', 'reft_config.json'));
    await page.getByLabel('reft_weights.safetensors', { exact: true }).setInputFiles(join(ARTIFACTS, 'alpha', 'reft_weights.safetensors'));
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await expect.poll(() => page.getByTestId('iv-status').innerText()).toContain('Stored alpha (version 2)');
    expect((await json(api, 'GET', '/v1/interventions/alpha')).body).toMatchObject({ name: 'alpha', version: 2 });
    expect(tab.problems).toEqual([]);
  });

  it('trains on 20 rows from the page with a live loss curve, then generates the taught phrase with one click', async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/training`);
    const rows = TRAIN_OPENINGS.map((prompt) => JSON.stringify({ prompt, completion: NEW_SENTENCE })).join('\n');
    await page.getByLabel(/^Rows, one JSON object per line/).fill(rows);
    expect(await page.getByTestId('train-rows').innerText()).toBe('20 rows');
    // the recipe of the training tests, fewer epochs at a higher rate: the phrase is learnt in ~160 steps
    await page.getByLabel('Name of the result').fill('frog-song');
    await page.getByLabel('Epochs', { exact: true }).fill('8');
    await page.getByLabel('Learning rate', { exact: true }).fill('0.02');
    await page.getByRole('button', { name: 'Start training' }).click();

    const status = page.getByTestId('job-status');
    const chart = page.getByTestId('loss-chart');
    await status.waitFor();
    const seenWhileRunning = new Set<number>();
    const until = Date.now() + 180_000;
    for (;;) {
      const [state, points] = await Promise.all([status.getAttribute('data-status'), chart.getAttribute('data-points')]);
      if (state === 'running') seenWhileRunning.add(Number(points));
      if (state === 'succeeded' || state === 'failed' || state === 'cancelled') {
        expect(state, await status.innerText()).toBe('succeeded');
        break;
      }
      expect(Date.now()).toBeLessThan(until);
      await new Promise((r) => setTimeout(r, 100));
    }
    // the curve holds the run at the end (a fast machine may finish 160 steps between two events,
    // so the points gained while running are checked on the long job below)
    const final = Number(await chart.getAttribute('data-points'));
    expect(final).toBeGreaterThan(0);
    expect(final).toBeGreaterThanOrEqual(Math.max(0, ...seenWhileRunning));
    expect(await status.innerText()).toMatch(/step 160 of 160 · loss \d\.\d{4} · \d+ tokens\/s/);
    await shoot(page, 'training');

    await page.getByRole('button', { name: 'Generate with frog-song' }).click();
    await page.waitForURL(/#\/generate\?intervention=frog-song/);
    // the page selects it once its list of interventions has loaded
    await expect.poll(() => page.getByLabel('Intervention 1', { exact: true }).inputValue(), { timeout: 10_000 }).toBe('frog-song');
    await fillGenerate(page, TRAIN_OPENINGS[10], { ...SAMPLING, temperature: 0, max_new_tokens: 16 });
    const run = await startRun(page, 'Generate');
    expect(await paneText(page, 'steered', run)).toContain(NEW_SENTENCE.trim().slice(0, 26));

    // a long job: its curve gains points while it runs; then it is cancelled from the page
    await page.goto(`${server.url}/#/training`);
    await page.getByLabel('Name of the result').fill('long-run');
    await page.getByLabel('Epochs', { exact: true }).fill('500');
    await page.getByRole('button', { name: 'Start training' }).click();
    await page.locator('[data-testid=job-status][data-status=running]').waitFor({ timeout: 60_000 });
    const growing = new Set<number>();
    const growUntil = Date.now() + 120_000;
    while (growing.size < 2) {
      const [state, points] = await Promise.all([status.getAttribute('data-status'), chart.getAttribute('data-points')]);
      expect(state).toBe('running');
      if (Number(points) > 0) growing.add(Number(points));
      expect(Date.now()).toBeLessThan(growUntil);
      await new Promise((r) => setTimeout(r, 100));
    }
    await page.getByRole('button', { name: 'Cancel the job' }).click();
    await page.locator('[data-testid=job-status][data-status=cancelled]').waitFor({ timeout: 30_000 });
    const jobs = await json(api, 'GET', '/v1/training/jobs?limit=1');
    expect(jobs.body.data[0]).toMatchObject({ name: 'long-run', status: 'cancelled' });
    expect(tab.problems).toEqual([]);
  }, 300_000);

  it('trains from the table: added and removed rows are what the job gets', async () => {
    const { page } = tab;
    await page.goto(`${server.url}/#/training`);
    await page.getByLabel('Table').check();
    const rows = [
      { prompt: 'Once upon a time', completion: ' a frog sang.' },
      { prompt: 'dropped row', completion: ' never sent' },
      { prompt: 'The cat', completion: ' sat on a mat.' },
      { prompt: 'Lily said', completion: ' hello.' },
    ];
    await page.getByRole('button', { name: 'Add a row' }).click();
    for (const [i, r] of rows.entries()) {
      await page.getByLabel(`Prompt ${i + 1}`, { exact: true }).fill(r.prompt);
      await page.getByLabel(`Completion ${i + 1}`, { exact: true }).fill(r.completion);
    }
    expect(await page.getByTestId('train-rows').innerText()).toBe('4 rows');
    await page.getByRole('button', { name: 'Remove row 2' }).click();
    expect(await page.getByTestId('train-rows').innerText()).toBe('3 rows');
    await page.getByLabel('Name of the result').fill('from-table');
    await page.getByLabel('Epochs', { exact: true }).fill('1');
    await page.getByRole('button', { name: 'Start training' }).click();

    let job: any;
    await expect
      .poll(async () => (job = ((await json(api, 'GET', '/v1/training/jobs')).body.data as any[]).find((j) => j.name === 'from-table')))
      .toBeTruthy();
    const sent = [rows[0], rows[2], rows[3]].map((r) => JSON.stringify(r)).join('\n') + '\n';
    expect((await json(api, 'GET', `/v1/files/${job.training_file}`)).body).toMatchObject({ bytes: Buffer.byteLength(sent) });
    await page.locator('[data-testid=job-status][data-status=succeeded]').waitFor({ timeout: 60_000 });
    expect(tab.problems).toEqual([]);
  });

  it('shows the usage by day', async () => {
    const { page } = tab;
    const usage = await json(api, 'GET', '/v1/usage');
    expect(usage.body.totals.requests).toBeGreaterThan(0);
    await page.goto(`${server.url}/#/usage`);
    await page.reload();
    const requests = page.getByTestId('usage-requests');
    await requests.waitFor();
    expect(Number(await requests.innerText())).toBeGreaterThanOrEqual(usage.body.totals.requests);
    expect(await page.getByTestId('usage-table').locator('tbody tr').count()).toBe(usage.body.data.length);
    await shoot(page, 'usage');
    expect(tab.problems).toEqual([]);
  });
});

describe('the web playground with API keys', () => {
  const ADMIN = 'playground-admin-key-0123456789abcdef';
  let server: ServerProcess;
  const keys: Record<string, string> = {};

  beforeAll(async () => {
    server = await startServerProcess({ env: { REFT_ADMIN_KEY: ADMIN }, args: ['--no-worker'] });
    const admin = { url: server.url, key: ADMIN };
    for (const name of ['acme', 'globex']) {
      const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name });
      keys[name] = (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`)).body.key;
    }
    expect((await upload({ url: server.url, key: keys.acme }, artifactFiles('alpha'), { name: 'acme-secret' })).status).toBe(201);
  });
  afterAll(async () => {
    expect(await server.stop()).toBe(0);
  });

  it('asks for a key, refuses a wrong one, and shows a tenant only its own interventions', async () => {
    const tab = await openTab(server.url);
    const { page } = tab;
    const keyField = page.getByLabel('API key', { exact: true });
    await keyField.fill('rft_this-key-does-not-exist');
    await page.getByRole('button', { name: 'Use this key' }).click();
    const refused = page.locator('#access-key-error');
    await refused.waitFor();
    expect(await refused.innerText()).toContain('api_key_invalid');
    expect(await page.evaluate('sessionStorage.length')).toBe(0);
    await shoot(page, 'access');

    await keyField.fill(keys.globex);
    await page.getByRole('button', { name: 'Use this key' }).click();
    await page.goto(`${server.url}/#/interventions`);
    const table = page.getByTestId('iv-table');
    await table.waitFor();
    expect(await table.innerText()).not.toContain('acme-secret');
    const options = await page.getByLabel('Intervention 1', { exact: true }).locator('option').allTextContents();
    expect(options.join()).not.toContain('acme-secret');
    // kept for the tab only
    expect(await page.evaluate('[localStorage.length, sessionStorage.length]')).toEqual([0, 1]);

    await page.goto(`${server.url}/#/access`);
    await page.getByRole('button', { name: 'Forget the key' }).click();
    await keyField.fill(keys.acme);
    await page.getByRole('button', { name: 'Use this key' }).click();
    await page.goto(`${server.url}/#/interventions`);
    await page.locator('tr[data-name="acme-secret"]').waitFor();
    expect(tab.problems).toEqual([]);
    await tab.context.close();
  });
});
