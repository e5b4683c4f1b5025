import { Redis } from 'ioredis'
import type { GatewayConfig } from './config.js'
import type { ProcessState } from './state.js'
import type { FastifyBaseLogger } from 'fastify'

/**
 * The process's one Redis client, shared by the rate-limit and cache stores. ioredis's defaults
 * make commands wait forever while Redis is down (PITFALLS.md); here a command fails fast instead
 * (no offline queue, one retry) so a store can fail open, and the client reconnects by itself.
 * Returns undefined when no `redis:` is configured (single instance, in-memory stores).
 */
export function sharedRedis (config: GatewayConfig, state: ProcessState, log?: FastifyBaseLogger): Redis | undefined {
  const settings = config.redis
  if (settings === undefined) return undefined
  return state.get('redis', () => {
    const client = new Redis(settings.url, {
      connectTimeout: settings.connectTimeout,
      commandTimeout: settings.connectTimeout,
      maxRetriesPerRequest: 1,
      enableOfflineQueue: false,
      lazyConnect: false,
      retryStrategy: (times) => Math.min(times * 100, 2000)
    })
    // Without an 'error' listener ioredis prints every failed reconnect. Log an outage once when
    // it starts and once when Redis is back, not on every retry; the URL (with any password) never.
    let down = false
    client.on('error', (err: NodeJS.ErrnoException) => {
      if (down) return
      down = true
      log?.warn({ code: err.code ?? err.name }, 'redis unavailable: shared stores fail open until it returns')
    })
    client.on('ready', () => {
      if (!down) return
      down = false
      log?.info('redis available again')
    })
    return client
  }, async (client) => { client.disconnect() })
}
