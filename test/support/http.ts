import { request as httpRequest } from 'node:http';
import type { ArtifactFiles } from './artifacts.ts';

/** Small helpers for talking to a server process over real HTTP. */
export interface Api {
  url: string;
  key?: string;
}

export function headers(api: Api, extra: Record<string, string> = {}): Record<string, string> {
  return { ...(api.key ? { authorization: `Bearer ${api.key}` } : {}), ...extra };
}

export async function json(
  api: Api,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; body: any; headers: Headers }> {
  const res = await fetch(api.url + path, {
    method,
    headers: headers(api, body === undefined ? {} : { 'content-type': 'application/json' }),
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    /* not JSON */
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

/** One sample's value from the server's /metrics (`name` with its labels, as the line starts); NaN when absent. */
export async function metricValue(api: Api, name: string): Promise<number> {
  const text = (await json(api, 'GET', '/metrics')).body as string;
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return Number(line?.split(' ')[1] ?? NaN);
}

export function artifactForm(files: Partial<ArtifactFiles>, fields: Record<string, string> = {}): FormData {
  const form = new FormData();
  if (files.config !== undefined) form.append('config', new Blob([files.config], { type: 'application/json' }), 'reft_config.json');
  if (files.weights !== undefined)
    form.append('weights', new Blob([files.weights], { type: 'application/octet-stream' }), 'reft_weights.safetensors');
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  return form;
}

export async function upload(
  api: Api,
  files: Partial<ArtifactFiles>,
  fields: Record<string, string> = {},
): Promise<{ status: number; body: any; headers: Headers }> {
  const res = await fetch(`${api.url}/v1/interventions`, { method: 'POST', headers: headers(api), body: artifactForm(files, fields) });
  return { status: res.status, body: await res.json(), headers: res.headers };
}

/** Reads a server-sent-events response into its parsed `data:` payloads. */
export async function sse(res: Response): Promise<unknown[]> {
  const text = await res.text();
  return text
    .split('\n\n')
    .map((frame) =>
      frame
        .split('\n')
        .filter((l) => l.startsWith('data: '))
        .map((l) => l.slice(6))
        .join('\n'),
    )
    .filter((d) => d.length > 0)
    .map((d) => (d === '[DONE]' ? d : JSON.parse(d)));
}

/** A request whose path is sent exactly as given (fetch normalises "..", even percent-encoded). */
export function rawRequest(api: Api, method: string, path: string): Promise<{ status: number; body: any; headers: Headers }> {
  return new Promise((resolve, reject) => {
    const url = new URL(api.url);
    const req = httpRequest({ host: url.hostname, port: url.port, method, path, headers: headers(api) }, (res) => {
      let text = '';
      res.on('data', (d) => (text += d));
      res.on('end', () => {
        const h = new Headers();
        for (const [k, v] of Object.entries(res.headers)) if (typeof v === 'string') h.set(k, v);
        let body: unknown = text;
        try {
          body = JSON.parse(text);
        } catch {
          /* not JSON */
        }
        resolve({ status: res.statusCode ?? 0, body, headers: h });
      });
    });
    req.on('error', reject);
    req.end();
  });
}
