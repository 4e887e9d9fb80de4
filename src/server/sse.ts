import type { FastifyReply, FastifyRequest } from 'fastify';

/**
 * A server-sent-events response. Taking the raw socket over from fastify, it writes
 * `data: <json>` frames; `signal` aborts when the client goes away, which cancels the
 * generation at the engine's next step.
 */
export class SseStream {
  private readonly controller = new AbortController();
  private ended = false;

  constructor(
    private readonly request: FastifyRequest,
    private readonly reply: FastifyReply,
  ) {
    reply.hijack();
    reply.raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    reply.raw.flushHeaders();
    // 'close' fires on the response when the connection ends before we end it.
    reply.raw.on('close', () => {
      if (!this.ended) this.controller.abort();
    });
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  send(data: unknown): void {
    if (this.ended || this.controller.signal.aborted) return;
    this.reply.raw.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.reply.raw.end();
    this.request.log.debug('stream ended');
  }
}
