import { Redis } from 'ioredis'
import type { GatewayConfig } from './config.js'
import type { ProcessState } from './state.js'

/**
 * The process's one Redis client, shared by the rate-limit and cache stores. ioredis's defaults
 * make commands wait forever while Redis is down (PITFALLS.md); here a command fails fast instead
 * (no offline queue, one retry) so a store can fail open, and the client reconnects by itself.
 * Returns undefined when no `redis:` is configured (single instance, in-memory stores).
 */
export function sharedRedis (config: GatewayConfig, state: ProcessState): Redis | undefined {
  const settings = config.redis
  if (settings === undefined) return undefined
  return state.get('redis', () => new Redis(settings.url, {
    connectTimeout: settings.connectTimeout,
    commandTimeout: settings.connectTimeout,
    maxRetriesPerRequest: 1,
    enableOfflineQueue: false,
    lazyConnect: false,
    retryStrategy: (times) => Math.min(times * 100, 2000)
  }), async (client) => { client.disconnect() })
}
