import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { request } from 'undici'
import type { Redis } from 'ioredis'
import { startGateway, startRedis, startUpstream } from './helper.js'
import { registry } from '../src/metrics.js'

async function status (url: string): Promise<number> {
  const res = await request(url)
  await res.body.dump()
  return res.statusCode
}

async function storeErrors (): Promise<number> {
  const m = await registry.getSingleMetric('gatehouse_rate_limit_store_errors_total')?.get()
  return m?.values[0]?.value ?? 0
}

/** Restarts redis-server on a port (an outage ending), stopped after the test. */
async function restartRedis (t: { after: (fn: () => Promise<void>) => void }, port: number): Promise<void> {
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'ignore'] })
  t.after(async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return
    proc.kill('SIGKILL')
    await once(proc, 'exit')
  })
  await new Promise<void>((resolve, reject) => {
    proc.stdout?.on('data', (c: Buffer) => { if (c.toString().includes('Ready to accept connections')) resolve() })
    proc.once('exit', (code) => reject(new Error(`redis-server exited with ${String(code)}`)))
  })
}

/** Resolves once the gateway's shared Redis client is connected (ioredis reconnects by itself). */
async function untilReady (client: Redis, timeoutMs: number): Promise<void> {
  if (client.status === 'ready') return
  await once(client, 'ready', { signal: AbortSignal.timeout(timeoutMs) })
}

function clientOf (gw: { gateway: { state: { get: <T>(key: string, create: () => T) => T } } }): Redis {
  return gw.gateway.state.get<Redis>('redis', () => { throw new Error('no redis client') })
}

test('two gateway instances sharing one Redis enforce one exact limit; a Redis outage fails open and recovers', async (t) => {
  const redis = await startRedis(t)
  const up = await startUpstream(t)
  const fixture = {
    config: { redis: { url: redis.url, keyPrefix: 'gh-test:' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 5, window: '1m' } } }
  }
  const one = await startGateway(t, fixture)
  const two = await startGateway(t, fixture)
  await untilReady(clientOf(one), 10_000)
  await untilReady(clientOf(two), 10_000)

  // Alternate between the instances: 5 pass in total, not 5 each.
  const results: number[] = []
  for (let i = 0; i < 10; i++) results.push(await status(`${(i % 2 === 0 ? one : two).url}/svc/x`))
  assert.deepEqual(results, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429])
  // Concurrent requests through both: still refused, the script is atomic.
  const burst = await Promise.all(Array.from({ length: 10 }, (_, i) => status(`${(i % 2 === 0 ? one : two).url}/svc/y`)))
  assert.ok(burst.every((s) => s === 429))
  assert.equal(up.received.length, 5)

  // Outage: the gateway keeps answering, counting in its own memory, and says so in a metric.
  const errorsBefore = await storeErrors()
  await redis.stop()
  const during = await status(`${one.url}/svc/z`)
  assert.equal(during, 200)
  assert.ok(await storeErrors() > errorsBefore)
  // Still a limit per instance while degraded.
  const local: number[] = []
  for (let i = 0; i < 6; i++) local.push(await status(`${one.url}/svc/z`))
  assert.deepEqual(local, [200, 200, 200, 200, 429, 429])

  // Redis is back (empty: a restart lost the counters): the instances share counters again.
  await restartRedis(t, redis.port)
  await untilReady(clientOf(one), 15_000)
  await untilReady(clientOf(two), 15_000)
  const after: number[] = []
  for (let i = 0; i < 7; i++) after.push(await status(`${(i % 2 === 0 ? two : one).url}/svc/w`))
  assert.deepEqual(after, [200, 200, 200, 200, 200, 429, 429])
})
