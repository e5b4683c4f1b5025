import { test } from 'node:test'
import assert from 'node:assert/strict'
import type http from 'node:http'
import http2 from 'node:http2'
import { once } from 'node:events'
import { request } from 'undici'
import { freePort, rawRequest, startGateway, startUpstream } from './helper.js'
import { delta, parseExposition, scrapeAdmin, seriesOf, settled, sumOf, valueOf } from './metrics-exposition.js'
import { NO_ROUTE } from '../src/metrics.js'
import { createCa } from './certs.js'

const cacheable = (_req: http.IncomingMessage, res: http.ServerResponse): void => {
  res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'public, max-age=60', 'content-length': '6' })
  res.end('cached')
}

test('traffic through routes is counted exactly per route, method and status, with histogram counts', async (t) => {
  const up = await startUpstream(t)
  const cached = await startUpstream(t, cacheable)
  const hanging = await startUpstream(t, () => {})
  const closedPort = await freePort()
  const once0 = { attempts: 0 }
  const gw = await startGateway(t, {
    config: { apiKeys: { keys: { tester: 'k-0123456789abcdef' } } },
    routes: {
      'mt-ok': { match: { prefix: '/mt-ok' }, upstream: { targets: [{ url: up.url }], retries: once0 } },
      'mt-refused': { match: { prefix: '/mt-refused' }, upstream: { targets: [{ url: `http://127.0.0.1:${closedPort}` }], retries: once0 } },
      'mt-slow': { match: { prefix: '/mt-slow' }, upstream: { targets: [{ url: hanging.url }], timeouts: { response: '300ms' }, retries: once0 } },
      'mt-auth': { match: { prefix: '/mt-auth' }, auth: { apiKey: true }, upstream: { targets: [{ url: up.url }], retries: once0 } },
      'mt-limited': { match: { prefix: '/mt-limited' }, rateLimit: { max: 1, window: '1m' }, upstream: { targets: [{ url: up.url }], retries: once0 } },
      'mt-cached': { match: { prefix: '/mt-cached' }, cache: { enabled: true }, upstream: { targets: [{ url: cached.url }], retries: once0 } }
    }
  })
  const before = await scrapeAdmin(gw.adminUrl)
  const get = async (path: string, headers: Record<string, string> = {}): Promise<number> => {
    const res = await request(gw.url + path, { headers })
    await res.body.dump()
    return res.statusCode
  }
  for (let i = 0; i < 3; i++) assert.equal(await get(`/mt-ok/item/${i}`), 200)
  const post = await request(`${gw.url}/mt-ok/items`, { method: 'POST', body: '{"a":1}', headers: { 'content-type': 'application/json' } })
  await post.body.dump()
  assert.equal(post.statusCode, 200)
  assert.equal(await get('/mt-missing/a'), 404)
  assert.equal(await get('/mt-missing/b'), 404)
  assert.equal(await get('/mt-refused/x'), 502)
  assert.equal(await get('/mt-slow/x'), 504)
  assert.equal(await get('/mt-auth/x'), 401)
  assert.equal(await get('/mt-auth/x', { 'x-api-key': 'k-0123456789abcdef' }), 200)
  assert.equal(await get('/mt-limited/x'), 200)
  assert.equal(await get('/mt-limited/x'), 429)
  const miss = await request(`${gw.url}/mt-cached/x`)
  await miss.body.dump()
  const hit = await request(`${gw.url}/mt-cached/x`)
  await hit.body.dump()
  assert.deepEqual([miss.headers['x-cache'], hit.headers['x-cache']], ['MISS', 'HIT'])

  const expected: Array<[string, string, string, number]> = [
    ['mt-ok', 'GET', '200', 3], ['mt-ok', 'POST', '200', 1], [NO_ROUTE, 'GET', '404', 2],
    ['mt-refused', 'GET', '502', 1], ['mt-slow', 'GET', '504', 1], ['mt-auth', 'GET', '401', 1],
    ['mt-auth', 'GET', '200', 1], ['mt-limited', 'GET', '200', 1], ['mt-limited', 'GET', '429', 1],
    ['mt-cached', 'GET', '200', 2]
  ]
  const total = expected.reduce((n, [, , , c]) => n + c, 0)
  const after = await settled(gw.adminUrl, (f) => sumOf(f, 'gatehouse_requests_total', {}) - sumOf(before, 'gatehouse_requests_total', {}) >= total)
  for (const [route, method, status, count] of expected) {
    assert.equal(delta(before, after, 'gatehouse_requests_total', { route, method, status }), count, `requests_total{${route},${method},${status}}`)
  }
  // Nothing else was counted: the sum of all deltas is the number of requests sent.
  assert.equal(sumOf(after, 'gatehouse_requests_total', {}) - sumOf(before, 'gatehouse_requests_total', {}), total)

  const durations: Array<[string, string, number]> = [
    ['mt-ok', 'GET', 3], ['mt-ok', 'POST', 1], [NO_ROUTE, 'GET', 2], ['mt-refused', 'GET', 1],
    ['mt-slow', 'GET', 1], ['mt-auth', 'GET', 2], ['mt-limited', 'GET', 2], ['mt-cached', 'GET', 2]
  ]
  for (const [route, method, count] of durations) {
    assert.equal(delta(before, after, 'gatehouse_request_duration_seconds_count', { route, method }), count, `duration_count{${route},${method}}`)
    assert.equal(delta(before, after, 'gatehouse_request_duration_seconds_bucket', { route, method, le: '+Inf' }), count)
  }
  // The 504 waited for the 300 ms response timeout: it cannot be in a bucket below that.
  assert.equal(delta(before, after, 'gatehouse_request_duration_seconds_bucket', { route: 'mt-slow', method: 'GET', le: '0.25' }), 0)
  assert.ok(delta(before, after, 'gatehouse_request_duration_seconds_sum', { route: 'mt-slow', method: 'GET' }) >= 0.3)

  // The concerns' own counters, from the same traffic.
  assert.equal(sumOf(after, 'gatehouse_auth_failures_total', { route: 'mt-auth' }) - sumOf(before, 'gatehouse_auth_failures_total', { route: 'mt-auth' }), 1)
  assert.equal(delta(before, after, 'gatehouse_rate_limited_total', { route: 'mt-limited' }), 1)
  assert.equal(delta(before, after, 'gatehouse_cache_total', { route: 'mt-cached', result: 'miss' }), 1)
  assert.equal(delta(before, after, 'gatehouse_cache_total', { route: 'mt-cached', result: 'hit' }), 1)
  assert.equal(delta(before, after, 'gatehouse_upstream_requests_total', { route: 'mt-ok', target: up.url, outcome: 'ok' }), 4)
  assert.equal(delta(before, after, 'gatehouse_upstream_requests_total', { route: 'mt-refused', target: `http://127.0.0.1:${closedPort}`, outcome: 'error' }), 1)
  assert.equal(delta(before, after, 'gatehouse_upstream_requests_total', { route: 'mt-slow', target: hanging.url, outcome: 'timeout' }), 1)
  assert.equal(delta(before, after, 'gatehouse_upstream_duration_seconds_count', { route: 'mt-ok', target: up.url }), 4)
  assert.equal(valueOf(after, 'gatehouse_requests_in_flight', {}), 0)
})

test('the exposition parses strictly, with HELP and TYPE for every family and the default Node metrics', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { 'mt-parse': { match: { prefix: '/mt-parse' }, upstream: { targets: [{ url: up.url }] } } } })
  const res = await request(`${gw.url}/mt-parse/x`)
  await res.body.dump()
  const scrape = await request(`${gw.adminUrl}/metrics`)
  assert.equal(scrape.statusCode, 200)
  assert.match(String(scrape.headers['content-type']), /^text\/plain; version=0\.0\.4/)
  const families = parseExposition(await scrape.body.text())
  for (const f of families.values()) {
    assert.notEqual(f.help, '', `HELP of ${f.name}`)
    assert.notEqual(f.type, 'untyped', `TYPE of ${f.name}`)
    assert.notEqual(f.type, 'summary', `${f.name}: histograms aggregate, summaries do not`)
  }
  for (const name of ['process_cpu_user_seconds_total', 'process_resident_memory_bytes', 'nodejs_eventloop_lag_seconds', 'nodejs_eventloop_lag_p99_seconds', 'nodejs_heap_size_used_bytes', 'gatehouse_config_version', 'gatehouse_requests_in_flight']) {
    assert.ok(families.has(name), name)
  }
  // Buckets from 1 ms to 30 s.
  const les = seriesOf(families, 'gatehouse_request_duration_seconds_bucket').map((l) => l.le)
  assert.ok(les.includes('0.001') && les.includes('30') && les.includes('+Inf'))
  // The strict parser refuses what Prometheus would refuse.
  assert.throws(() => parseExposition('# TYPE a counter\na{x="1} 1\n'))
  assert.throws(() => parseExposition('# TYPE a counter\na 1\na 2\n'))
  assert.throws(() => parseExposition('# TYPE a counter\na 1\n# TYPE b gauge\nb 1\na{x="y"} 1\n'))
  assert.throws(() => parseExposition('# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'))
  assert.throws(() => parseExposition('# TYPE a counter\na 1'))
})

test('/metrics is on the admin listener only, unless metrics.onMainListener; a scrape is not counted', async (t) => {
  const up = await startUpstream(t)
  const routes = { 'mt-main': { match: { prefix: '/mt-main' }, upstream: { targets: [{ url: up.url }] } } }
  const closed = await startGateway(t, { routes })
  const res = await request(`${closed.url}/metrics`)
  await res.body.dump()
  assert.equal(res.statusCode, 404)
  await closed.close()

  const open = await startGateway(t, { routes, config: { metrics: { onMainListener: true } } })
  const before = await scrapeAdmin(open.adminUrl)
  const main = await request(`${open.url}/metrics`)
  assert.equal(main.statusCode, 200)
  assert.match(String(main.headers['content-type']), /^text\/plain; version=0\.0\.4/)
  const families = parseExposition(await main.body.text())
  assert.ok(families.has('gatehouse_requests_total'))
  const probe = await request(`${open.url}/mt-main/x`)
  await probe.body.dump()
  const after = await settled(open.adminUrl, (f) => delta(before, f, 'gatehouse_requests_total', { route: 'mt-main', method: 'GET', status: '200' }) >= 1)
  assert.equal(sumOf(after, 'gatehouse_requests_total', {}) - sumOf(before, 'gatehouse_requests_total', {}), 1, 'only the proxied request')
})

test('in-flight requests are a gauge, and a client that goes away is counted as 499', async (t) => {
  let arrived!: () => void
  const arrival = new Promise<void>((resolve) => { arrived = resolve })
  let upstreamReq: http.IncomingMessage | undefined
  const up = await startUpstream(t, (req) => {
    upstreamReq = req
    req.on('error', () => {})
    arrived()
  })
  const gw = await startGateway(t, { routes: { 'mt-hang': { match: { prefix: '/mt-hang' }, upstream: { targets: [{ url: up.url }], timeouts: { response: '30s' }, retries: { attempts: 0 } } } } })
  const before = await scrapeAdmin(gw.adminUrl)
  const ac = new AbortController()
  const pending = request(`${gw.url}/mt-hang/x`, { signal: ac.signal }).catch((err: Error) => err)
  await arrival
  const during = await scrapeAdmin(gw.adminUrl)
  assert.equal(delta(before, during, 'gatehouse_requests_in_flight', {}), 1)
  // Not events.once: it would reject on the request's 'aborted' error, which is the point here.
  const upstreamClosed = new Promise((resolve) => (upstreamReq as http.IncomingMessage).once('close', resolve))
  ac.abort()
  assert.ok(await pending instanceof Error)
  // The gateway aborts the upstream request when its client leaves.
  await upstreamClosed
  const after = await settled(gw.adminUrl, (f) => delta(before, f, 'gatehouse_requests_total', { route: 'mt-hang', method: 'GET', status: '499' }) >= 1)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: 'mt-hang', method: 'GET', status: '499' }), 1)
  assert.equal(delta(before, after, 'gatehouse_request_duration_seconds_count', { route: 'mt-hang', method: 'GET' }), 1)
  assert.equal(delta(before, after, 'gatehouse_requests_in_flight', {}), 0)
})

test('config reloads are counted ok and failed, and the version in service is a gauge', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { 'mt-reload': { match: { prefix: '/mt-reload' }, upstream: { targets: [{ url: up.url }] } } } })
  const before = await scrapeAdmin(gw.adminUrl)
  assert.equal(valueOf(before, 'gatehouse_config_version', {}), gw.gateway.version)
  const ok = await request(`${gw.adminUrl}/reload`, { method: 'POST' })
  assert.equal(ok.statusCode, 200)
  await ok.body.dump()
  const afterOk = await scrapeAdmin(gw.adminUrl)
  assert.equal(delta(before, afterOk, 'gatehouse_config_reloads_total', { result: 'ok' }), 1)
  assert.equal(delta(before, afterOk, 'gatehouse_config_reloads_total', { result: 'failed' }), 0)
  assert.equal(valueOf(afterOk, 'gatehouse_config_version', {}), gw.gateway.version)
  assert.ok(valueOf(afterOk, 'gatehouse_config_last_reload_success_timestamp_seconds', {}) >= Math.floor(Date.now() / 1000) - 60)

  gw.writeRoute('broken', { match: { prefix: 'no-slash' } })
  const bad = await request(`${gw.adminUrl}/reload`, { method: 'POST' })
  assert.equal(bad.statusCode, 422)
  await bad.body.dump()
  const afterBad = await scrapeAdmin(gw.adminUrl)
  assert.equal(delta(afterOk, afterBad, 'gatehouse_config_reloads_total', { result: 'failed' }), 1)
  assert.equal(delta(afterOk, afterBad, 'gatehouse_config_reloads_total', { result: 'ok' }), 0)
  assert.equal(valueOf(afterBad, 'gatehouse_config_version', {}), valueOf(afterOk, 'gatehouse_config_version', {}))
})

test('HTTP/2 requests are counted with their status, and a reset stream as 499', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  let arrived!: () => void
  const arrival = new Promise<void>((resolve) => { arrived = resolve })
  const up = await startUpstream(t, (req, res) => {
    if (req.url === '/hang') {
      req.on('error', () => {})
      arrived()
      return
    }
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' })
    res.end('ok')
  })
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile } },
    routes: { 'mt-h2': { match: { prefix: '/mt-h2' }, upstream: { targets: [{ url: up.url }], retries: { attempts: 0 } } } }
  })
  const session = http2.connect(`https://127.0.0.1:${gw.port}`, { ca: ca.ca })
  t.after(() => session.destroy())
  await once(session, 'connect')
  const get = async (path: string): Promise<number> => {
    const stream = session.request({ ':path': path, ':method': 'GET' })
    const [headers] = await once(stream, 'response') as [http2.IncomingHttpHeaders]
    for await (const chunk of stream) void chunk
    return Number(headers[':status'])
  }
  const before = await scrapeAdmin(gw.adminUrl)
  for (let i = 0; i < 3; i++) assert.equal(await get('/mt-h2/x'), 200)
  assert.equal(await get('/mt-h2-missing'), 404)
  const hanging = session.request({ ':path': '/mt-h2/hang', ':method': 'GET' })
  hanging.on('error', () => {})
  await arrival
  hanging.close(http2.constants.NGHTTP2_CANCEL)
  const after = await settled(gw.adminUrl, (f) => delta(before, f, 'gatehouse_requests_total', { route: 'mt-h2', method: 'GET', status: '499' }) >= 1)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: 'mt-h2', method: 'GET', status: '200' }), 3)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: NO_ROUTE, method: 'GET', status: '404' }), 1)
  assert.equal(delta(before, after, 'gatehouse_requests_total', { route: 'mt-h2', method: 'GET', status: '499' }), 1)
  assert.equal(sumOf(after, 'gatehouse_requests_total', {}) - sumOf(before, 'gatehouse_requests_total', {}), 5)
  assert.equal(delta(before, after, 'gatehouse_requests_in_flight', {}), 0)
})

test('requests the HTTP parser refuses before routing are counted by status', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { 'mt-parser': { match: { prefix: '/mt-parser' }, upstream: { targets: [{ url: up.url }] } } } })
  const before = await scrapeAdmin(gw.adminUrl)
  assert.match(await rawRequest(gw.port, 'GET /mt-parser/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n'), /^HTTP\/1\.1 400 /)
  assert.match(await rawRequest(gw.port, `GET /mt-parser/x HTTP/1.1\r\nHost: a\r\nX-Big: ${'a'.repeat(32 * 1024)}\r\n\r\n`), /^HTTP\/1\.1 431 /)
  const after = await scrapeAdmin(gw.adminUrl)
  assert.equal(delta(before, after, 'gatehouse_parser_refused_total', { status: '400' }), 1)
  assert.equal(delta(before, after, 'gatehouse_parser_refused_total', { status: '431' }), 1)
  // They reached no route, so they are not in the per-route counts.
  assert.equal(sumOf(after, 'gatehouse_requests_total', {}) - sumOf(before, 'gatehouse_requests_total', {}), 0)
})
