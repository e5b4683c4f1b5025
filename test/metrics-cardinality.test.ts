import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { Pool, request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { delta, seriesOf, settled, valueOf, type Families } from './metrics-exposition.js'
import { NO_ROUTE } from '../src/metrics.js'

test('10,000 distinct random paths, queries and hosts create no new label values', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { 'mt-rand': { match: { prefix: '/mt-rand' }, upstream: { targets: [{ url: up.url }] } } } })
  // Make the series of this route exist, then count what 10,000 random requests add.
  for (const path of ['/mt-rand/warm', '/warm-missing']) {
    const res = await request(gw.url + path)
    await res.body.dump()
  }
  const before = await settled(gw.adminUrl, (f) => valueOf(f, 'gatehouse_requests_total', { route: NO_ROUTE, method: 'GET', status: '404' }) > 0)
  const seriesBefore = new Set(gatehouseSeries(before))

  const pool = new Pool(gw.url, { connections: 16, pipelining: 1 })
  t.after(async () => { await pool.close() })
  const N = 10_000
  const tokens: string[] = []
  let next = 0
  let routed = 0
  const worker = async (): Promise<void> => {
    while (next < N) {
      const i = next++
      const token = randomBytes(8).toString('hex')
      if (i % 500 === 0) tokens.push(token)
      // One in five reaches the route (proxied, so slower); the others match no route.
      const path = i % 5 === 0 ? `/mt-rand/${token}/${i}?q=${token}` : `/${token}/${i}?${token}=1`
      const res = await pool.request({ path, method: 'GET', headers: { host: `${token}.example.test` } })
      await res.body.dump()
      if (res.statusCode === 200) routed++
      else assert.equal(res.statusCode, 404)
    }
  }
  await Promise.all(Array.from({ length: 32 }, worker))
  assert.equal(routed, N / 5)

  const after = await settled(gw.adminUrl, (f) => delta(before, f, 'gatehouse_requests_total', { route: NO_ROUTE, method: 'GET', status: '404' }) >= N - N / 5)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: 'mt-rand', method: 'GET', status: '200' }), N / 5)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: NO_ROUTE, method: 'GET', status: '404' }), N - N / 5)
  const added = gatehouseSeries(after).filter((s) => !seriesBefore.has(s))
  assert.deepEqual(added, [], 'no new series')
  const text = [...after.values()].flatMap((f) => f.samples).map((s) => JSON.stringify(s.labels)).join('\n')
  for (const token of tokens) assert.ok(!text.includes(token), `label values never hold request data (${token})`)
  for (const labels of seriesOf(after, 'gatehouse_requests_total')) {
    assert.ok(['mt-rand', NO_ROUTE].includes(labels.route), labels.route)
  }
})

function gatehouseSeries (f: Families): string[] {
  return [...f.values()].filter((fam) => fam.name.startsWith('gatehouse_')).flatMap((fam) => fam.samples.map((s) => s.name + JSON.stringify(s.labels)))
}
