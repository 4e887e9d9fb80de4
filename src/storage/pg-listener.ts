import { Client } from 'pg';
import type { ClientConfig, Notification, QueryConfig } from 'pg';

/** Reconnect backoff: doubling from the first delay up to the cap (with jitter). */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 2_000;
/** The connection is pinged this often: a dead TCP peer may never send a reset. */
const PING_MS = 15_000;
const PING = { text: 'SELECT 1', query_timeout: 5_000 } as QueryConfig;

export interface ListenerEvents {
  notification(msg: Notification): void;
  /** The connection came back after a loss (notifications sent meanwhile are lost). */
  reconnected(): void;
  /** The connection was lost (reported once per outage). */
  lost(err: Error): void;
}

/**
 * One dedicated client that LISTENs on the store's channels (LISTEN is per session, so not a
 * pooled one). Whenever the connection ends or a ping fails it reconnects, with capped
 * exponential backoff, and LISTENs again. (pg-listen does this too, but is unmaintained.)
 */
export class Listener {
  private client: Client | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private failures = 0;
  private closed = false;

  constructor(
    private readonly config: ClientConfig,
    private readonly channels: readonly string[],
    private readonly events: ListenerEvents,
  ) {}

  /** Connects once; throws if that fails (the store then fails to open). */
  async start(): Promise<void> {
    await this.connect();
    // A dead peer that never sent a reset leaves the socket open but silent: a ping finds out.
    const ping = (client: Client) => client.query(PING).catch((e: Error) => this.lose(client, e));
    this.pingTimer = setInterval(() => this.client && ping(this.client), PING_MS).unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.reconnectTimer ?? undefined);
    clearInterval(this.pingTimer ?? undefined);
    const client = this.client;
    this.client = null;
    await client?.end().catch(() => {});
  }

  private async connect(): Promise<void> {
    const client = new Client(this.config);
    this.client = client;
    client.on('error', (e) => this.lose(client, e));
    client.on('end', () => this.lose(client, new Error('the listener connection ended')));
    // A client we already gave up on (a ping timed out but it lives on) must not deliver twice.
    client.on('notification', (msg) => client === this.client && this.events.notification(msg));
    try {
      await client.connect();
      // Channel names are constants of the store, not input: safe to splice in.
      for (const channel of this.channels) await client.query(`LISTEN ${channel}`);
    } catch (e) {
      this.lose(client, e as Error);
      throw e;
    }
    if (this.closed) await client.end().catch(() => {});
  }

  /** Drops a failed client (once) and schedules the next connect. */
  private lose(client: Client, err: Error): void {
    if (client !== this.client) return;
    this.client = null;
    client.end().catch(() => {});
    if (!this.pingTimer || this.closed || this.reconnectTimer) return; // not started yet: start() throws
    if (this.failures === 0) this.events.lost(err);
    const cap = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** this.failures++);
    // Jitter: processes that lost the same server don't all come back in the same millisecond.
    // Unref'd: reconnecting alone must not keep a process alive.
    this.reconnectTimer = setTimeout(() => void this.reconnect(), cap / 2 + Math.random() * (cap / 2)).unref();
  }

  private async reconnect(): Promise<void> {
    this.reconnectTimer = null;
    const connected = await this.connect().then(
      () => true,
      () => false, // lose() has scheduled the next attempt
    );
    if (!connected || this.closed) return;
    this.failures = 0;
    this.events.reconnected();
  }
}
