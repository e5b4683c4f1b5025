import { test } from 'node:test'
import { EventEmitter, once } from 'node:events'
import assert from 'node:assert/strict'
import type { FastifyRequest } from 'fastify'
import { request } from 'undici'
import { startGateway, startUpstream, type Upstream } from './helper.js'
import { CircuitBreaker, HashRing, LeastConnections, PowerOfTwo, Random, RetryBudget, Target, UpstreamPool, Weighted } from '../src/balancer/index.js'
import type { RouteDefinition } from '../src/config.js'

type Upstream0 = NonNullable<RouteDefinition['upstream']>
const fakeRequest = { ip: '127.0.0.1', headers: {} } as unknown as FastifyRequest
const all = (): boolean => true

function upstreamConfig (extra: Partial<Upstream0> = {}): Upstream0 {
  return {
    targets: [],
    balancer: 'round-robin',
    timeouts: { connect: 1000, response: 1000 },
    retries: { attempts: 2 },
    connections: 10,
    keepAliveTimeout: 1000,
    ...extra
  } as Upstream0
}

/** Sends `n` GETs, `concurrency` at a time, and returns how many each upstream received. */
async function spread (url: string, n: number, concurrency = 16, headers: Record<string, string> = {}): Promise<number[]> {
  let sent = 0
  const statuses: number[] = []
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (sent < n) {
      sent++
      const res = await request(url, { headers })
      await res.body.dump()
      statuses.push(res.statusCode)
    }
  }))
  assert.deepEqual(statuses.filter((s) => s !== 200), [], 'every request succeeded')
  return statuses
}

function within (actual: number, expected: number, tolerance: number, what: string): void {
  assert.ok(Math.abs(actual - expected) <= expected * tolerance, `${what}: ${actual} is not within ${tolerance * 100}% of ${expected}`)
}

async function threeUpstreams (t: { after: (fn: () => Promise<void>) => void }): Promise<Upstream[]> {
  return await Promise.all([startUpstream(t), startUpstream(t), startUpstream(t)])
}

test('round-robin spreads 3,000 requests evenly over three real targets', async (t) => {
  const ups = await threeUpstreams(t)
  const gw = await startGateway(t, { routes: { rr: { match: { prefix: '/rr' }, upstream: { targets: ups.map((u) => ({ url: u.url })) } } } })
  await spread(`${gw.url}/rr/x`, 3000)
  for (const [i, u] of ups.entries()) within(u.received.length, 1000, 0.1, `target ${i}`)
})

test('weighted follows the weights over 3,000 requests (1:2:3)', async (t) => {
  const ups = await threeUpstreams(t)
  const gw = await startGateway(t, {
    routes: { w: { match: { prefix: '/w' }, upstream: { balancer: 'weighted', targets: ups.map((u, i) => ({ url: u.url, weight: i + 1 })) } } }
  })
  await spread(`${gw.url}/w/x`, 3000)
  within(ups[0].received.length, 500, 0.1, 'weight 1')
  within(ups[1].received.length, 1000, 0.1, 'weight 2')
  within(ups[2].received.length, 1500, 0.1, 'weight 3')
})

test('weighted is smooth, as nginx: 5,1,1 never sends a burst to the heavy target', () => {
  const [a, b, c] = [new Target('http://a:1', 5), new Target('http://b:1', 1), new Target('http://c:1', 1)]
  const w = new Weighted()
  const seq = Array.from({ length: 7 }, () => w.pick([a, b, c], all)?.origin)
  assert.deepEqual(seq, ['http://a:1', 'http://a:1', 'http://b:1', 'http://a:1', 'http://c:1', 'http://a:1', 'http://a:1'])
  // An unavailable target is skipped and the others keep their ratio.
  const seq2 = Array.from({ length: 6 }, () => w.pick([a, b, c], (t) => t !== a)?.origin)
  assert.equal(seq2.filter((o) => o === 'http://b:1').length, 3)
})

test('least-connections sends new requests away from a target holding slow requests', async (t) => {
  const releases: Array<() => void> = []
  const arrived = new EventEmitter()
  const slow = await startUpstream(t, (req, res) => {
    if (req.url !== '/slow') {
      res.end('fast')
      return
    }
    releases.push(() => res.end('slow'))
    arrived.emit('slow')
  })
  const fast1 = await startUpstream(t, (_req, res) => res.end('fast'))
  const fast2 = await startUpstream(t, (_req, res) => res.end('fast'))
  const gw = await startGateway(t, {
    routes: { lc: { match: { prefix: '/lc' }, upstream: { balancer: 'least-connections', targets: [slow, fast1, fast2].map((u) => ({ url: u.url })), retries: { attempts: 0 } } } }
  })
  t.after(() => { for (const r of releases) r() })
  // Requests to /slow are answered at once by the other targets and held by the slow one:
  // send them one by one until the slow target holds one.
  const pending: Array<Promise<unknown>> = []
  while (releases.length < 1) {
    const held = once(arrived, 'slow')
    const p = request(`${gw.url}/lc/slow`).then(async (r) => await r.body.text())
    pending.push(p)
    await Promise.race([p, held])
  }
  const before = slow.received.length
  for (let i = 0; i < 30; i++) {
    const res = await request(`${gw.url}/lc/fast`)
    assert.equal(await res.body.text(), 'fast')
  }
  assert.equal(slow.received.length, before, 'no new request went to the busy target')
  assert.ok(fast1.received.filter((r) => r.url === '/fast').length >= 10, 'the idle targets share the load')
  assert.ok(fast2.received.filter((r) => r.url === '/fast').length >= 10, 'the idle targets share the load')
  for (const r of releases.splice(0)) r()
  await Promise.all(pending)
})

test('p2c picks the less loaded of two choices', () => {
  const [a, b] = [new Target('http://a:1'), new Target('http://b:1')]
  a.inflight = 5
  const p2c = new PowerOfTwo()
  for (let i = 0; i < 20; i++) assert.equal(p2c.pick([a, b], all), b)
  const lc = new LeastConnections()
  assert.equal(lc.pick([a, b], all), b)
  assert.equal(lc.pick([a, b], (t) => t !== b), a)
})

test('consistent-hash: a key stays on one target; adding a 4th target moves about 1/4 of 1,000 keys, all to it', () => {
  const targets = [1, 2, 3].map((i) => new Target(`http://10.0.0.${i}:8080`))
  const ring3 = new HashRing(targets)
  const fourth = new Target('http://10.0.0.4:8080')
  const ring4 = new HashRing([...targets, fourth])
  const keys = Array.from({ length: 1000 }, (_, i) => `user-${i}`)
  const counts = new Map<Target, number>()
  let moved = 0
  for (const k of keys) {
    const before = ring3.lookup(k) as Target
    assert.equal(ring3.lookup(k), before, 'the same key always maps to the same target')
    counts.set(before, (counts.get(before) ?? 0) + 1)
    const after = ring4.lookup(k)
    if (after !== before) {
      moved++
      assert.equal(after, fourth, 'a key only ever moves to the new target')
    }
  }
  assert.ok(moved >= 150 && moved <= 350, `${moved} of 1000 keys moved (expected about 250)`)
  for (const [, n] of counts) assert.ok(n >= 200 && n <= 470, `keys per target: ${[...counts.values()].join(', ')}`)
  // A key whose target is down goes to another, and comes back when it is up again.
  const k = keys[0]
  const home = ring3.lookup(k) as Target
  const away = ring3.lookup(k, (t) => t !== home)
  assert.notEqual(away, home)
  assert.equal(ring3.lookup(k), home)
})

test('consistent-hash by header over real sockets: one key, one target', async (t) => {
  const ups = await threeUpstreams(t)
  const gw = await startGateway(t, {
    routes: { ch: { match: { prefix: '/ch' }, upstream: { balancer: 'consistent-hash', hashKey: 'header:x-user-id', targets: ups.map((u) => ({ url: u.url })) } } }
  })
  for (let i = 0; i < 20; i++) {
    const res = await request(`${gw.url}/ch/x`, { headers: { 'x-user-id': 'alice' } })
    await res.body.dump()
  }
  assert.deepEqual(ups.map((u) => u.received.length).sort((a, b) => a - b), [0, 0, 20])
  for (let i = 0; i < 60; i++) {
    const res = await request(`${gw.url}/ch/x`, { headers: { 'x-user-id': `user-${i}` } })
    await res.body.dump()
  }
  assert.ok(ups.every((u) => u.received.length > 0), 'different keys spread over every target')
})

test('circuit breaker: closed -> open at the failure ratio -> half-open probes -> closed, or open again', () => {
  const states: string[] = []
  const b = new CircuitBreaker({ failureRatio: 0.5, minRequests: 4, window: 10_000, openFor: 1000, halfOpenRequests: 2 }, (s) => states.push(s))
  let now = 1_000_000
  b.record(now, b.admit(now), false)
  b.record(now, b.admit(now), false)
  b.record(now, b.admit(now), true)
  assert.equal(b.state, 'closed', 'below minRequests it stays closed')
  b.record(now, b.admit(now), false)
  assert.equal(b.state, 'open')
  assert.equal(b.allows(now + 999), false)
  now += 1000
  assert.equal(b.allows(now), true)
  assert.equal(b.state, 'half-open')
  const p1 = b.admit(now)
  const p2 = b.admit(now)
  assert.equal(b.allows(now), false, 'only halfOpenRequests probes at a time')
  b.record(now, p1, true)
  b.record(now, p2, false)
  assert.equal(b.state, 'open', 'a failed probe opens it again')
  now += 1000
  assert.equal(b.allows(now), true)
  b.record(now, b.admit(now), true)
  b.record(now, b.admit(now), true)
  assert.equal(b.state, 'closed')
  assert.deepEqual(states, ['open', 'half-open', 'open', 'half-open', 'closed'])
})

test('passive outlier detection ejects after consecutive failures, doubles the ejection, never ejects more than half', () => {
  const pool = new UpstreamPool('passive-unit', upstreamConfig({ passive: { consecutiveFailures: 3, ejectFor: 1000, maxEjectFor: 3000, maxEjectedPercent: 50 } }),
    [1, 2, 3, 4].map((i) => new Target(`http://10.0.0.${i}:80`)))
  const [a, b, c] = pool.targets
  let now = 5_000_000
  const fail = (t: Target): void => pool.finished(t, pool.started(t, now), { ok: false, kind: 'reset' }, now)
  fail(a); fail(a)
  assert.ok(a.available(now), 'two failures in a row: still in')
  pool.finished(a, pool.started(a, now), { ok: true }, now)
  fail(a); fail(a)
  assert.ok(a.available(now), 'a success resets the count')
  fail(a)
  assert.equal(a.available(now), false, 'three in a row: ejected')
  assert.equal(a.ejectedUntil, now + 1000)
  for (let i = 0; i < 3; i++) fail(b)
  assert.equal(b.available(now), false, 'a second of four may go (50 %)')
  for (let i = 0; i < 3; i++) fail(c)
  assert.ok(c.available(now), 'a third may not: never more than half the targets ejected')
  now += 1001
  assert.ok(a.available(now), 'back after ejectFor')
  for (let i = 0; i < 3; i++) fail(a)
  assert.equal(a.ejectedUntil, now + 2000, 'the second ejection lasts twice as long')
  now += 2001
  for (let i = 0; i < 3; i++) fail(a)
  assert.equal(a.ejectedUntil, now + 3000, 'capped by maxEjectFor')
  pool.close()
})

test('retry budget: retries stay within the ratio of requests (with a small floor)', () => {
  const budget = new RetryBudget(0.2, 10_000, 3)
  const now = 1_000_000
  let granted = 0
  for (let i = 0; i < 100; i++) {
    budget.request(now)
    if (budget.tryRetry(now)) granted++
  }
  assert.equal(granted, 20)
  const quiet = new RetryBudget(0.2, 10_000, 3)
  quiet.request(now)
  assert.ok(quiet.tryRetry(now) && quiet.tryRetry(now) && quiet.tryRetry(now), 'a quiet route can still fail over')
  assert.equal(quiet.tryRetry(now), false)
  assert.ok(quiet.tryRetry(now + 20_000), 'the window slides')
})

test('random picks in proportion to weight, among available targets only', () => {
  const [a, b] = [new Target('http://a:1', 1), new Target('http://b:1', 3)]
  let seed = 42
  const rng = (): number => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 }
  const random = new Random(rng)
  let hitsB = 0
  for (let i = 0; i < 4000; i++) if (random.pick([a, b], all) === b) hitsB++
  within(hitsB, 3000, 0.1, 'weight 3 of 4')
  for (let i = 0; i < 50; i++) assert.equal(random.pick([a, b], (t) => t !== b), a)
  assert.equal(random.pick([a, b], () => false), undefined)
})

test('a pool with no available target picks nothing', () => {
  const pool = new UpstreamPool('none-unit', upstreamConfig(), [new Target('http://10.0.0.9:80')])
  pool.targets[0].healthy = false
  assert.equal(pool.pick(fakeRequest), undefined)
  assert.equal(pool.unavailable().circuit, false)
})
