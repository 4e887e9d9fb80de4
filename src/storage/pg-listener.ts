import { Client } from 'pg';
import type { ClientConfig, Notification } from 'pg';

/** Listener reconnect backoff: doubling from the first delay up to the cap (with jitter). */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 2_000;
/** The listener checks its connection this often: a dead TCP peer may never send a reset. */
const LISTENER_PING_MS = 15_000;
const LISTENER_PING_TIMEOUT_MS = 5_000;

export interface ListenerEvents {
  notification(msg: Notification): void;
  /** The connection came back after a loss (notifications sent meanwhile are lost). */
  reconnected(): void;
  /** The connection was lost (reported once per outage). */
  lost(err: Error): void;
}

/**
 * One dedicated client that LISTENs on the store's channels (a pooled connection can't: LISTEN
 * is per session). It reconnects by itself, with capped exponential backoff, whenever the
 * connection ends or a periodic ping fails, and LISTENs again.
 */
export class Listener {
  private client: Client | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private failures = 0;
  private started = false;
  private closed = false;

  constructor(
    private readonly config: ClientConfig,
    private readonly channels: readonly string[],
    private readonly events: ListenerEvents,
  ) {}

  /** Connects once; throws if that fails (the store then fails to open). */
  async start(): Promise<void> {
    await this.connect();
    this.started = true;
    this.pingTimer = setInterval(() => void this.ping(), LISTENER_PING_MS);
    this.pingTimer.unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.pingTimer) clearInterval(this.pingTimer);
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
    client.on('notification', (msg) => {
      if (client === this.client) this.events.notification(msg);
    });
    try {
      await client.connect();
      // Channel names are constants of this module, not input: safe to splice in.
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
    if (!this.started || this.closed) return;
    if (this.failures === 0) this.events.lost(err);
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.reconnectTimer || this.closed) return;
    const cap = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** this.failures);
    this.failures++;
    // Jitter: processes that lost the same server don't all come back in the same millisecond.
    const delay = cap / 2 + Math.random() * (cap / 2);
    this.reconnectTimer = setTimeout(() => void this.reconnect(), delay);
    // Reconnecting is background upkeep: it alone must not keep a process alive.
    this.reconnectTimer.unref();
  }

  private async reconnect(): Promise<void> {
    this.reconnectTimer = null;
    try {
      await this.connect();
    } catch {
      return; // lose() has scheduled the next attempt
    }
    if (this.closed) return;
    this.failures = 0;
    this.events.reconnected();
  }

  /** A dead peer that never sent a reset leaves the socket open but silent: a ping finds out. */
  private async ping(): Promise<void> {
    const client = this.client;
    if (!client) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('the listener connection stopped answering')), LISTENER_PING_TIMEOUT_MS);
    });
    try {
      await Promise.race([client.query('SELECT 1'), timeout]);
    } catch (e) {
      this.lose(client, e as Error);
    } finally {
      clearTimeout(timer);
    }
  }
}
