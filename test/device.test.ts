import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAdapter, resolveDevice, webgpuAdapter } from '../src/runtime/device.ts';
import { STORIES } from './support/fixtures.ts';
import { json, type Api } from './support/http.ts';
import { runCli, startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * --device on this machine: no CUDA provider, and Mesa's llvmpipe as the only Vulkan device (a
 * software adapter, taken only when WebGPU is asked for by name).
 */
describe('device resolution', () => {
  it("finds Mesa's llvmpipe through the Vulkan loader's log, and knows it is software", async () => {
    const adapter = await webgpuAdapter();
    expect(adapter).toMatchObject({ driver: 'libvulkan_lvp.so', software: true });
    expect(adapter!.name).toMatch(/^llvmpipe \(LLVM/);
  });

  it('auto takes the CPU over a software adapter; webgpu by name takes it', async () => {
    expect(await resolveDevice('auto')).toMatchObject({ device: 'cpu', adapter: 'cpu' });
    const webgpu = await resolveDevice('webgpu');
    expect(webgpu.device).toBe('webgpu');
    expect(webgpu.adapter).toMatch(/^llvmpipe \(LLVM .*\) \(libvulkan_lvp\.so, software\)$/);
    expect(await resolveDevice('cpu')).toEqual({ device: 'cpu', adapter: 'cpu' });
  });

  it("reads a hardware GPU's line as hardware, the last device line as the one in use", () => {
    const log = [
      'DRIVER:   Using "llvmpipe (LLVM 15.0.6, 256 bits)" with driver: "libvulkan_lvp.so"',
      'DRIVER:   Using "NVIDIA H200" with driver: "libGLX_nvidia.so.0"',
    ].join('\n');
    expect(parseAdapter(log)).toEqual({ name: 'NVIDIA H200', driver: 'libGLX_nvidia.so.0', software: false });
    expect(parseAdapter(log.split('\n')[0]).software).toBe(true);
  });

  it('with no Vulkan driver, generate --device webgpu stops in one line and auto runs on the CPU', async () => {
    // the loader's own switch: every driver disabled, as on a machine without any
    const env = { ...process.env, VK_LOADER_DRIVERS_DISABLE: '*' };
    expect(await webgpuAdapter(env)).toBeNull();
    const r = await runCli(
      ['generate', '--model', STORIES, '--device', 'webgpu', '--prompt', 'Once upon a time', '--max-new-tokens', '3'],
      env,
    );
    expect(r.status).not.toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim()).toBe(
      'reft-server: WebGPU found no adapter: install the Vulkan loader (libvulkan1) and a Vulkan driver for the GPU (Mesa 25 for llvmpipe), or run with --device cpu',
    );
    const auto = await runCli(['generate', '--model', STORIES, '--prompt', 'Once upon a time', '--max-new-tokens', '3'], env);
    expect(auto).toMatchObject({ status: 0, stdout: ', there was\n' });
  }, 120_000);
});

describe('a server says which device and adapter serve', () => {
  let server: ServerProcess;
  let api: Api;
  beforeAll(async () => {
    server = await startServerProcess({ args: ['--device', 'webgpu', '--no-worker'] });
    api = { url: server.url };
  }, 300_000);
  afterAll(async () => {
    await server?.stop();
  });

  it('in the model ready line, /readyz and /metrics, and generates the reference story there', async () => {
    const ready = server.logs.find((l) => l.msg === 'model ready')!;
    expect(ready).toMatchObject({ device: 'webgpu', adapter: expect.stringMatching(/^llvmpipe .*software\)$/) });
    const readyz = (await json(api, 'GET', '/readyz')).body;
    expect(readyz).toEqual({ status: 'ready', reason: 'ok', device: 'webgpu', adapter: ready.adapter });
    const metrics = await (await fetch(`${api.url}/metrics`)).text();
    expect(metrics).toContain(`reft_device_info{device="webgpu",adapter="${String(ready.adapter)}"} 1`);
    const gen = await json(api, 'POST', '/v1/generate', { prompt: 'Once upon a time', max_new_tokens: 12 });
    expect(gen.body.text).toBe(', there was a little girl named Lily. She'); // 12 tokens
  }, 300_000);

  it('a server left to choose (auto) serves on the CPU here, and says so', async () => {
    const cpu = await startServerProcess({ args: ['--no-worker'] });
    try {
      expect(cpu.logs.find((l) => l.msg === 'model ready')).toMatchObject({ device: 'cpu', adapter: 'cpu' });
      expect((await json({ url: cpu.url }, 'GET', '/readyz')).body).toMatchObject({ device: 'cpu', adapter: 'cpu' });
    } finally {
      await cpu.stop();
    }
  }, 120_000);
});
