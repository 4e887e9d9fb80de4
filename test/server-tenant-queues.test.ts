import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { headers, json, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * Issue 11 (fair queues): a generation over its tenant's concurrency waits in that tenant's own
 * queue, and only a full queue is a 429 with Retry-After, streams included. One slot and a queue
 * of one per tenant, over real HTTP to a real server process with two tenants.
 */
const ADMIN = 'admin-secret-for-tests-0123456789abcdef';
let server: ServerProcess;
let a: Api;
let b: Api;

beforeAll(async () => {
  server = await startServerProcess({
    env: { REFT_ADMIN_KEY: ADMIN },
    args: ['--tenant-max-concurrent', '1', '--tenant-max-queued', '1'],
  });
  const admin = { url: server.url, key: ADMIN };
  const keyOf = async (name: string) => {
    const tenant = await json(admin, 'POST', '/v1/admin/tenants', { name });
    expect(tenant.status).toBe(201);
    return (await json(admin, 'POST', `/v1/admin/tenants/${tenant.body.id}/keys`, {})).body.key as string;
  };
  a = { url: server.url, key: await keyOf('alpha') };
  b = { url: server.url, key: await keyOf('beta') };
});
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const generate = (api: Api, body: object, signal?: AbortSignal) =>
  fetch(`${api.url}/v1/generate`, {
    method: 'POST',
    headers: headers(api, { 'content-type': 'application/json' }),
    body: JSON.stringify({ prompt: 'Once upon a time', ...body }),
    signal,
  });

/** A stream that holds its tenant's one slot until `release()`. */
async function holdSlot(api: Api): Promise<{ release: () => Promise<void>; finished: () => boolean }> {
  const controller = new AbortController();
  const res = await generate(api, { max_new_tokens: 500, ignore_eos: true, stream: true }, controller.signal);
  expect(res.status).toBe(200);
  const reader = res.body!.getReader();
  await reader.read(); // it is generating
  let finished = false;
  const drained = (async () => {
    try {
      for (;;) if ((await reader.read()).done) break;
      finished = true;
    } catch {
      /* released */
    }
  })();
  return {
    release: async () => {
      controller.abort();
      await drained;
    },
    finished: () => finished,
  };
}

async function queuedRequests(): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  return Number(/^reft_tenant_queued_requests (\d+)/m.exec(text)![1]);
}

async function untilQueued(n: number): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if ((await queuedRequests()) === n) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`the tenant queues never held ${n} requests`);
}

describe('fair per-tenant generation queues', () => {
  it("with one tenant holding its concurrency, another tenant's request starts at once; the holder's next request waits, then succeeds", async () => {
    const holder = await holdSlot(a);
    const other = await json(b, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 });
    expect(other.status).toBe(200);
    expect(other.body.usage.completion_tokens).toBe(3);
    expect(holder.finished()).toBe(false); // tenant B did not wait for tenant A's stream

    let settled = false;
    const next = json(a, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 }).finally(() => (settled = true));
    await untilQueued(1);
    expect(settled).toBe(false);
    await holder.release();
    const waited = await next;
    expect(waited.status).toBe(200);
    expect(waited.body.usage.completion_tokens).toBe(3);
    await untilQueued(0);
  });

  it('a full queue is a 429 with Retry-After naming the limit, for streams and plain requests alike', async () => {
    const holder = await holdSlot(a);
    const queued = json(a, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 3 });
    await untilQueued(1);
    for (const stream of [false, true]) {
      const refused = await generate(a, { max_new_tokens: 3, stream });
      expect(refused.status).toBe(429);
      expect(refused.headers.get('retry-after')).toBe('1');
      expect(refused.headers.get('content-type')).toContain('application/problem+json');
      const body = (await refused.json()) as { code: string; category: string };
      expect(body).toMatchObject({ code: 'tenant_queue_full', category: 'rate_limited' });
    }
    // the OpenAI routes too, in OpenAI's error shape
    const chat = await fetch(`${a.url}/v1/chat/completions`, {
      method: 'POST',
      headers: headers(a, { 'content-type': 'application/json' }),
      body: JSON.stringify({ model: 'stories260k', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2, stream: true }),
    });
    expect(chat.status).toBe(429);
    expect(chat.headers.get('retry-after')).toBe('1');
    expect(((await chat.json()) as { error: { code: string } }).error.code).toBe('tenant_queue_full');
    // another tenant is not refused
    expect((await json(b, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 2 })).status).toBe(200);
    await holder.release();
    expect((await queued).status).toBe(200);
  });

  it('a queued request whose client disconnects leaves the queue', async () => {
    const holder = await holdSlot(a);
    const gone = new AbortController();
    const abandoned = generate(a, { max_new_tokens: 3 }, gone.signal).catch((e: Error) => e);
    await untilQueued(1);
    gone.abort();
    expect(await abandoned).toBeInstanceOf(Error);
    await untilQueued(0);
    // its place is free: the next request queues (no 429) and runs once the slot frees
    const next = json(a, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 2 });
    await untilQueued(1);
    await holder.release();
    expect((await next).status).toBe(200);
    // and the server generates for everyone afterwards
    expect((await json(b, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 2 })).status).toBe(200);
  });
});
