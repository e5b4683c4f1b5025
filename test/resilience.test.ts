import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { once } from 'node:events'
import { request } from 'undici'
import { startGateway, startUpstream, freePort, type TestGateway } from './helper.js'
import { registry } from '../src/metrics.js'
import type { RouteUpstreamStatus } from '../src/balancer/index.js'

interface Upstreams { version: number, routes: RouteUpstreamStatus[] }

async function upstreams (gw: TestGateway): Promise<Upstreams> {
  const res = await request(`${gw.adminUrl}/upstreams`)
  assert.equal(res.statusCode, 200)
  return await res.body.json() as Upstreams
}

async function targetOf (gw: TestGateway, route: string, url: string): Promise<RouteUpstreamStatus['targets'][number]> {
  const r = (await upstreams(gw)).routes.find((x) => x.route === route)
  const t = r?.targets.find((x) => x.url === url)
  assert.ok(t !== undefined, `${route} ${url} is listed`)
  return t
}

/** Polls `check` every 20 ms until it holds; fails after `ms`. */
async function waitFor (what: string, ms: number, check: () => Promise<boolean>): Promise<number> {
  const started = Date.now()
  while (!(await check())) {
    if (Date.now() - started > ms) assert.fail(`${what}: not within ${ms} ms`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return Date.now() - started
}

async function get (url: string, init: Parameters<typeof request>[1] = {}): Promise<{ status: number, headers: Record<string, unknown>, body: string }> {
  const res = await request(url, init)
  return { status: res.statusCode, headers: res.headers, body: await res.body.text() }
}

/** A plain server on a given port (to bring a killed target back on its address). */
async function listenOn (port: number, handler: http.RequestListener): Promise<http.Server> {
  const server = http.createServer(handler)
  server.listen(port, '127.0.0.1')
  await once(server, 'listening')
  return server
}

async function closeServer (server: http.Server): Promise<void> {
  if (!server.listening) return
  server.closeAllConnections()
  await new Promise<void>((resolve) => server.close(() => resolve()))
}

async function metricValue (name: string, labels: Record<string, string>): Promise<number | undefined> {
  const metric = registry.getSingleMetric(name)
  const data = await metric?.get()
  const v = data?.values.find((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val))
  return v?.value
}

const ok: http.RequestListener = (req, res) => {
  if (req.url === '/health') res.end('ok')
  else res.end(`hello from ${String(req.socket.localPort)}`)
}

test('killing one of three targets under a stream of GETs: no client-visible error, marked unhealthy in time, back after restart', async (t) => {
  const ups = await Promise.all([startUpstream(t, ok), startUpstream(t, ok), startUpstream(t, ok)])
  const interval = 100
  const threshold = 2
  const gw = await startGateway(t, {
    routes: {
      svc: {
        match: { prefix: '/svc' },
        upstream: {
          targets: ups.map((u) => ({ url: u.url })),
          // A refused probe fails at once; the generous timeout keeps a loaded test machine from failing the live ones.
          healthCheck: { path: '/health', interval: `${interval}ms`, timeout: '2s', healthyThreshold: threshold, unhealthyThreshold: threshold },
          timeouts: { connect: '500ms', response: '2s' },
          retries: { attempts: 2 }
        }
      }
    }
  })

  const statuses: number[] = []
  const errors: string[] = []
  const load = { running: true }
  const stream = Promise.all(Array.from({ length: 4 }, async () => {
    while (load.running) {
      const res = await get(`${gw.url}/svc/x`)
      statuses.push(res.status)
      if (res.status !== 200) errors.push(res.body)
    }
  }))
  t.after(async () => { load.running = false; await stream })
  const victim = ups[1]
  await waitFor('traffic reaches every target', 5000, async () => victim.received.some((r) => r.url === '/x'))

  await victim.close()
  const detectMs = await waitFor('the killed target is marked unhealthy', 3 * interval * 1.1 * threshold + 2000, async () => !(await targetOf(gw, 'svc', victim.url)).healthy)
  const down = await targetOf(gw, 'svc', victim.url)
  assert.equal(down.lastCheck?.ok, false)
  assert.equal(down.available, false)
  assert.equal(await metricValue('gatehouse_upstream_healthy', { route: 'svc', target: victim.url }), 0)
  const sentWhileDown = statuses.length
  await waitFor('the stream goes on', 10_000, async () => statuses.length > sentWhileDown + 20)

  const revived = await listenOn(victim.port, ok)
  t.after(async () => { await closeServer(revived) })
  let revivedHits = 0
  revived.on('request', (req: http.IncomingMessage) => { if (req.url === '/x') revivedHits++ })
  await waitFor('the restarted target is healthy again', 5000, async () => (await targetOf(gw, 'svc', victim.url)).healthy)
  await waitFor('and gets traffic again', 5000, async () => revivedHits > 5)
  load.running = false
  await stream

  assert.ok(statuses.length > 40, `${statuses.length} requests sent`)
  assert.deepEqual(errors, [], 'no client saw an error')
  t.diagnostic(`unhealthy after ${detectMs} ms; ${statuses.length} requests, all 200`)
})

test('a hanging target: the attempt times out at timeouts.response, is retried on another target, and its breaker opens', async (t) => {
  const hung: http.ServerResponse[] = []
  const hanging = await startUpstream(t, (_req, res) => { hung.push(res) })
  const good = await startUpstream(t, ok)
  const gw = await startGateway(t, {
    routes: {
      hang: {
        match: { prefix: '/hang' },
        upstream: {
          targets: [{ url: hanging.url }, { url: good.url }],
          timeouts: { connect: '500ms', response: '500ms' },
          retries: { attempts: 1 },
          circuitBreaker: { failureRatio: 0.5, minRequests: 2, window: '30s', openFor: '30s', halfOpenRequests: 1 }
        }
      }
    }
  })
  const started = Date.now()
  const first = await get(`${gw.url}/hang/a`)
  const elapsed = Date.now() - started
  assert.equal(first.status, 200, 'the retry on the other target answered')
  assert.equal(first.body, `hello from ${good.port}`)
  assert.equal(hanging.received.length, 1)
  assert.ok(elapsed >= 480, `the first attempt waited for timeouts.response (${elapsed} ms)`)

  for (let i = 0; i < 10; i++) assert.equal((await get(`${gw.url}/hang/b`)).status, 200)
  assert.equal(hanging.received.length, 2, 'after minRequests failures the circuit opened: no more requests reach the hanging target')
  const target = await targetOf(gw, 'hang', hanging.url)
  assert.equal(target.circuit, 'open')
  assert.equal(target.available, false)
  assert.equal(target.lastFailure?.kind, 'timeout')
  assert.equal(await metricValue('gatehouse_circuit_open', { route: 'hang', target: hanging.url }), 1)
  assert.equal(await metricValue('gatehouse_upstream_requests_total', { route: 'hang', target: hanging.url, outcome: 'retried' }), 2)
  for (const res of hung) res.destroy()
})

test('a single hanging target: 504 with Proxy-Status after timeouts.response, nothing leaked', async (t) => {
  const hung: http.ServerResponse[] = []
  const hanging = await startUpstream(t, (_req, res) => { hung.push(res) })
  const gw = await startGateway(t, {
    routes: { one: { match: { prefix: '/one' }, upstream: { targets: [{ url: hanging.url }], timeouts: { response: '200ms' }, retries: { attempts: 2 } } } }
  })
  const res = await get(`${gw.url}/one/x`)
  assert.equal(res.status, 504)
  assert.equal(JSON.parse(res.body).code, 'GATEHOUSE_UPSTREAM_TIMEOUT')
  assert.equal(res.headers['proxy-status'], 'gatehouse; error=http_response_timeout')
  assert.equal(hanging.received.length, 1, 'no other target to try: one attempt')
  assert.ok(!res.body.includes('127.0.0.1'))
  for (const r of hung) r.destroy()
})

test('POST to a failing target is not retried; GET is, and so is a POST with Idempotency-Key on a route that opts in', async (t) => {
  const failing = await startUpstream(t, (req, res) => { req.resume(); req.socket.destroy() })
  const bodies: string[] = []
  const good = await startUpstream(t, (req, res) => {
    let body = ''
    req.setEncoding('utf8')
    req.on('data', (c: string) => { body += c })
    req.on('end', () => { bodies.push(body); res.end('ok') })
  })
  const targets = [{ url: failing.url }, { url: good.url }]
  const gw = await startGateway(t, {
    routes: {
      plain: { match: { prefix: '/plain' }, upstream: { targets, retries: { attempts: 2 } } },
      keyed: { match: { prefix: '/keyed' }, upstream: { targets, retries: { attempts: 2, idempotencyKey: true } } }
    }
  })
  // Round-robin starts at the first target: the failing one.
  const post = await get(`${gw.url}/plain/orders`, { method: 'POST', body: '{"n":1}', headers: { 'content-type': 'application/json' } })
  assert.equal(post.status, 502)
  assert.equal(JSON.parse(post.body).code, 'GATEHOUSE_UPSTREAM_RESET')
  assert.equal(failing.received.filter((r) => r.method === 'POST').length, 1)
  assert.equal(good.received.length, 0, 'the POST was not sent again')

  const before = failing.received.length
  const getRes = await get(`${gw.url}/plain/orders`)
  assert.equal(getRes.status, 200)
  const getRes2 = await get(`${gw.url}/plain/orders`)
  assert.equal(getRes2.status, 200, 'a GET that met the failing target went to the other one')
  assert.equal(failing.received.length, before + 1)

  const keyed = await get(`${gw.url}/keyed/orders`, { method: 'POST', body: '{"n":2}', headers: { 'content-type': 'application/json', 'idempotency-key': 'k-1' } })
  assert.equal(keyed.status, 200)
  assert.equal(failing.received.filter((r) => r.url === '/orders' && r.method === 'POST').length, 2)
  assert.equal(bodies.at(-1), '{"n":2}', 'the kept body was replayed intact')
  const unkeyed = await get(`${gw.url}/keyed/orders`, { method: 'POST', body: '{"n":3}', headers: { 'content-type': 'application/json' } })
  assert.ok(unkeyed.status === 200 || unkeyed.status === 502)
  if (unkeyed.status === 502) assert.equal(bodies.at(-1), '{"n":2}', 'without the key the POST was not replayed')
})

test("reply-from's 503 loop is off: a GET answered 503 reaches each target once per configured attempt", async (t) => {
  const single = await startUpstream(t, (_req, res) => { res.writeHead(503, { 'content-type': 'text/plain' }); res.end('busy') })
  const trio = await Promise.all([0, 1, 2].map(async () => await startUpstream(t, (_req, res) => { res.writeHead(503); res.end('busy') })))
  const gw = await startGateway(t, {
    routes: {
      single: { match: { prefix: '/single' }, upstream: { targets: [{ url: single.url }], retries: { attempts: 2 } } },
      trio: { match: { prefix: '/trio' }, upstream: { targets: trio.map((u) => ({ url: u.url })), retries: { attempts: 2 } } }
    }
  })
  const one = await get(`${gw.url}/single/x`)
  assert.equal(one.status, 503)
  assert.equal(one.body, 'busy', "the upstream's own 503 is passed on")
  assert.equal(single.received.length, 1, 'one target: one attempt, not ten')

  const three = await get(`${gw.url}/trio/x`)
  assert.equal(three.status, 503)
  assert.deepEqual(trio.map((u) => u.received.length), [1, 1, 1], '1 + 2 retries, each on another target')
})

test("an upstream's Retry-After keeps requests away from it; its 503 is retried elsewhere", async (t) => {
  const busy = await startUpstream(t, (_req, res) => { res.writeHead(503, { 'retry-after': '30' }); res.end('later') })
  const good = await startUpstream(t, ok)
  const gw = await startGateway(t, {
    routes: { ra: { match: { prefix: '/ra' }, upstream: { targets: [{ url: busy.url }, { url: good.url }] } } }
  })
  for (let i = 0; i < 6; i++) assert.equal((await get(`${gw.url}/ra/x`)).status, 200)
  assert.equal(busy.received.length, 1)
  assert.equal((await targetOf(gw, 'ra', busy.url)).available, false)
})

test('no available target: 503 GATEHOUSE_NO_HEALTHY_UPSTREAM with Retry-After; all circuits open: GATEHOUSE_CIRCUIT_OPEN', async (t) => {
  const dead = `http://127.0.0.1:${await freePort()}`
  const failing = await startUpstream(t, (_req, res) => { res.writeHead(500); res.end('boom') })
  const gw = await startGateway(t, {
    routes: {
      dead: { match: { prefix: '/dead' }, upstream: { targets: [{ url: dead }], healthCheck: { path: '/health', interval: '50ms', timeout: '100ms', unhealthyThreshold: 1 } } },
      broken: { match: { prefix: '/broken' }, upstream: { targets: [{ url: failing.url }], circuitBreaker: { failureRatio: 0.5, minRequests: 2, window: '30s', openFor: '20s' } } }
    }
  })
  await waitFor('the dead target is unhealthy', 3000, async () => !(await targetOf(gw, 'dead', dead)).healthy)
  const none = await get(`${gw.url}/dead/x`)
  assert.equal(none.status, 503)
  assert.equal(JSON.parse(none.body).code, 'GATEHOUSE_NO_HEALTHY_UPSTREAM')
  assert.ok(Number(none.headers['retry-after']) >= 1)
  assert.equal(none.headers['proxy-status'], 'gatehouse; error=destination_unavailable')

  assert.equal((await get(`${gw.url}/broken/x`)).status, 500)
  assert.equal((await get(`${gw.url}/broken/x`)).status, 500)
  const open = await get(`${gw.url}/broken/x`)
  assert.equal(open.status, 503)
  assert.equal(JSON.parse(open.body).code, 'GATEHOUSE_CIRCUIT_OPEN')
  const retryAfter = Number(open.headers['retry-after'])
  assert.ok(retryAfter >= 15 && retryAfter <= 20, `Retry-After ${retryAfter} is the time until the circuit half-opens`)
  assert.equal(failing.received.length, 2)
})

test('GET /upstreams: per route and target, health, circuit, in-flight, failures, last check', async (t) => {
  const up = await startUpstream(t, ok)
  const gw = await startGateway(t, {
    routes: {
      shape: { match: { prefix: '/shape' }, upstream: { balancer: 'least-connections', targets: [{ url: up.url, weight: 3 }], healthCheck: { path: '/health', interval: '50ms', timeout: '500ms' } } }
    }
  })
  await waitFor('a probe ran', 3000, async () => (await targetOf(gw, 'shape', up.url)).lastCheck !== null)
  const body = await upstreams(gw)
  assert.equal(typeof body.version, 'number')
  const route = body.routes.find((r) => r.route === 'shape')
  assert.ok(route)
  assert.equal(route.balancer, 'least-connections')
  assert.equal(route.healthCheck, true)
  const target = route.targets[0]
  assert.deepEqual(Object.keys(target).sort(), ['available', 'circuit', 'consecutiveFailures', 'ejectedUntil', 'ejections', 'healthy', 'inflight', 'lastCheck', 'lastFailure', 'recentFailures', 'url', 'weight'])
  assert.equal(target.url, up.url)
  assert.equal(target.weight, 3)
  assert.equal(target.healthy, true)
  assert.equal(target.circuit, 'closed')
  assert.equal(target.inflight, 0)
  assert.equal(target.recentFailures, 0)
  assert.equal(target.lastCheck?.ok, true)
  assert.equal(target.lastCheck?.status, 200)
  assert.match(String(target.lastCheck?.at), /^\d{4}-\d\d-\d\dT/)
})

test('a reload that removes a route stops its health probes', async (t) => {
  const up = await startUpstream(t, ok)
  const probes = (): number => up.received.filter((r) => r.url === '/health').length
  const gw = await startGateway(t, {
    routes: { probed: { match: { prefix: '/probed' }, upstream: { targets: [{ url: up.url }], healthCheck: { path: '/health', interval: '30ms', timeout: '500ms' } } } }
  })
  await waitFor('probes run', 3000, async () => probes() >= 3)
  gw.writeRoute('probed', { match: { prefix: '/probed' }, upstream: { targets: [{ url: up.url }] } })
  const result = await gw.gateway.reload()
  assert.equal(result.ok, true)
  const after = probes()
  // Ten intervals without a probe: the old version's checker is gone.
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.ok(probes() <= after + 1, `${probes() - after} probes after the reload`)
  assert.equal((await targetOf(gw, 'probed', up.url)).lastCheck, null)
})

test('passive outlier detection over real sockets: consecutive 5xx eject a target for ejectFor', async (t) => {
  const bad = await startUpstream(t, (_req, res) => { res.writeHead(500); res.end('broken') })
  const goods = await Promise.all([startUpstream(t, ok), startUpstream(t, ok)])
  const gw = await startGateway(t, {
    routes: {
      outlier: {
        match: { prefix: '/outlier' },
        upstream: { targets: [bad, ...goods].map((u) => ({ url: u.url })), passive: { consecutiveFailures: 2, ejectFor: '30s' } }
      }
    }
  })
  const statuses: number[] = []
  for (let i = 0; i < 15; i++) statuses.push((await get(`${gw.url}/outlier/x`)).status)
  assert.equal(bad.received.length, 2, 'ejected after two 5xx in a row')
  assert.deepEqual(statuses.filter((s) => s !== 200), [500, 500], "a 500 is the upstream's answer: passed on, not retried")
  const target = await targetOf(gw, 'outlier', bad.url)
  assert.equal(target.healthy, false)
  assert.equal(target.ejections, 1)
  assert.ok(target.ejectedUntil !== null && Date.parse(target.ejectedUntil) > Date.now() + 20_000)
  assert.equal(target.lastFailure?.status, 500)
  assert.equal(await metricValue('gatehouse_upstream_healthy', { route: 'outlier', target: bad.url }), 0)
})

test('a reload keeps what the health checks know: a target found down stays out of the new version', async (t) => {
  const dead = `http://127.0.0.1:${await freePort()}`
  const up = await startUpstream(t, ok)
  const routeFile = (timeout: string): Record<string, unknown> => ({
    match: { prefix: '/kept' },
    // Three failed probes 300 ms apart: the new version cannot find out by itself within 500 ms.
    upstream: { targets: [{ url: dead }, { url: up.url }], healthCheck: { path: '/health', interval: '300ms', timeout, unhealthyThreshold: 3 } }
  })
  const gw = await startGateway(t, { routes: { kept: routeFile('500ms') } })
  await waitFor('the dead target is unhealthy', 5000, async () => !(await targetOf(gw, 'kept', dead)).healthy)
  gw.writeRoute('kept', routeFile('600ms'))
  assert.equal((await gw.gateway.reload()).ok, true)
  const after = await targetOf(gw, 'kept', dead)
  assert.equal(after.healthy, false, 'still unhealthy right after the reload, before any new probe')
  assert.equal(after.lastCheck?.ok, false)
  const res = await get(`${gw.url}/kept/x`, { method: 'POST', body: 'x' })
  assert.equal(res.status, 200, 'a POST with a streamed body is not sent to the known-dead target')
})

test('failing over a refused connection does not spend the retry budget: a dead target never surfaces a 502', async (t) => {
  const good = await startUpstream(t, (_req, res) => res.end('ok'))
  const dead = `http://127.0.0.1:${await freePort()}`
  const gw = await startGateway(t, {
    routes: {
      svc: {
        match: { prefix: '/svc' },
        // budget 0 leaves only the floor of 3 retries for everything else
        upstream: { targets: [{ url: dead }, { url: good.url }], retries: { attempts: 1, budget: 0 } }
      }
    }
  })
  const statuses: number[] = []
  for (let i = 0; i < 30; i++) statuses.push((await get(`${gw.url}/svc/x`)).status)
  assert.deepEqual(statuses.filter((s) => s !== 200), [], 'every request failed over to the live target')
  assert.equal(good.received.length, 30)
})

test('the reply-from way (a client that takes gzip) retries and fails over like the direct way', async (t) => {
  const trio = await Promise.all([0, 1, 2].map(async () => await startUpstream(t, (_req, res) => { res.writeHead(503); res.end('busy') })))
  const good = await startUpstream(t, ok)
  const dead = await freePort()
  const gw = await startGateway(t, {
    routes: {
      trio: { match: { prefix: '/trio' }, upstream: { targets: trio.map((u) => ({ url: u.url })), retries: { attempts: 2 } } },
      fo: { match: { prefix: '/fo' }, upstream: { targets: [{ url: `http://127.0.0.1:${dead}` }, { url: good.url }], retries: { attempts: 1 } } }
    }
  })
  const gzip = { headers: { 'accept-encoding': 'gzip' } }
  const three = await get(`${gw.url}/trio/x`, gzip)
  assert.equal(three.status, 503)
  assert.deepEqual(trio.map((u) => u.received.length), [1, 1, 1], '1 + 2 retries, each on another target')
  for (let i = 0; i < 4; i++) assert.equal((await get(`${gw.url}/fo/x`, gzip)).status, 200)
  assert.equal(good.received.length, 4)
})
