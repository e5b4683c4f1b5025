import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Counter, Histogram, Registry, AggregatorRegistry } from 'prom-client'
import { FastCounter, FastGauge, FastHistogram } from '../src/fast-metrics.js'

const BUCKETS = [0.001, 0.01, 0.1, 1, 10]

/** The same events recorded by prom-client's own metrics and by ours give the same exposition. */
test('fast metrics expose exactly what prom-client\'s own Counter and Histogram expose for the same events', async () => {
  const theirs = new Registry()
  const ours = new Registry()
  const c1 = new Counter({ name: 'x_total', help: 'h', labelNames: ['route', 'status'] as const, registers: [theirs] })
  const c2 = new FastCounter({ name: 'x_total', help: 'h', labelNames: ['route', 'status'] as const, registers: [ours] })
  const h1 = new Histogram({ name: 'y_seconds', help: 'h', labelNames: ['route'] as const, buckets: BUCKETS, registers: [theirs] })
  const h2 = new FastHistogram({ name: 'y_seconds', help: 'h', labelNames: ['route'] as const, buckets: BUCKETS, registers: [ours] })
  const samples = [0, 0.0005, 0.001, 0.0011, 0.05, 0.1, 0.7, 3, 10, 11, 99]
  for (const [i, v] of samples.entries()) {
    const route = i % 2 === 0 ? 'a' : 'b'
    c1.inc({ route, status: String(200 + (i % 3)) })
    c2.labels(route, String(200 + (i % 3))).inc()
    h1.observe({ route }, v)
    if (i % 3 === 0) h2.observe({ route }, v)
    else h2.labels(route).observe(v)
  }
  c1.inc({ route: 'a', status: '200' }, 5)
  c2.inc({ route: 'a', status: '200' }, 5)
  const sorted = (text: string): string[] => text.trim().split('\n').sort()
  assert.deepEqual(sorted(await ours.metrics()), sorted(await theirs.metrics()))

  // A reset zeroes the series and keeps the children in use working.
  ours.resetMetrics()
  theirs.resetMetrics()
  c2.labels('a', '200').inc()
  c1.inc({ route: 'a', status: '200' })
  const line = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('x_total{route="a",status="200"}'))
  assert.equal(line(await ours.metrics()), line(await theirs.metrics()))
})

test('fast metrics aggregate across cluster workers like prom-client\'s, and refuse bad input', async () => {
  const worker = async (n: number): Promise<unknown[]> => {
    const r = new Registry()
    const c = new FastCounter({ name: 'req_total', help: 'h', labelNames: ['route'] as const, registers: [r] })
    const h = new FastHistogram({ name: 'dur_seconds', help: 'h', labelNames: ['route'] as const, buckets: BUCKETS, registers: [r] })
    const g = new FastGauge({ name: 'inflight', help: 'h', registers: [r] })
    for (let i = 0; i < n; i++) { c.labels('a').inc(); h.labels('a').observe(0.005) }
    g.inc(n)
    return await r.getMetricsAsJSON()
  }
  const merged = AggregatorRegistry.aggregate([await worker(2), await worker(3)] as Parameters<typeof AggregatorRegistry.aggregate>[0])
  const text = await merged.metrics()
  assert.match(text, /^req_total\{route="a"\} 5$/m)
  assert.match(text, /^dur_seconds_bucket\{le="0\.01",route="a"\} 5$/m)
  assert.match(text, /^dur_seconds_count\{route="a"\} 5$/m)
  assert.match(text, /^inflight 5$/m)

  const c = new FastCounter({ name: 'bad_total', help: 'h', labelNames: ['route'] as const })
  assert.throws(() => c.labels('a', 'b'), /1 label values expected/)
  assert.throws(() => c.inc({}), /label route missing/)
  assert.throws(() => c.labels('a').inc(-1), /non-negative/)
  assert.throws(() => new FastHistogram({ name: 'h', help: 'h', buckets: BUCKETS }).labels().observe(NaN), /finite/)
})
