import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Readable } from 'node:stream'
import type http from 'node:http'
import http2 from 'node:http2'
import { once } from 'node:events'
import pino from 'pino'
import { Agent, request } from 'undici'
import { freePort, startGateway, startUpstream, type GatewayFixture } from './helper.js'
import { MAX_PATH, REDACTED, redactPath } from '../plugins/access-log.js'
import { createCa } from './certs.js'

type Line = Record<string, unknown>

/** A logger whose lines the test reads, and a way to await the access-log line of a request id. */
function recorder (): { logger: pino.Logger, raw: string[], line: (reqId: string) => Promise<Line> } {
  const raw: string[] = []
  const waiting = new Map<string, (line: Line) => void>()
  const seen = new Map<string, Line>()
  const stream = {
    // A destination gets bytes, not lines: access lines come in batches.
    write (chunk: string) {
      for (const text of chunk.split('\n')) {
        if (text === '') continue
        raw.push(text)
        const line = JSON.parse(text) as Line
        if (line.msg !== 'request' || typeof line.reqId !== 'string') continue
        seen.set(line.reqId, line)
        waiting.get(line.reqId)?.(line)
      }
    }
  }
  const logger = pino({ level: 'info' }, stream)
  const line = async (reqId: string): Promise<Line> => {
    const done = seen.get(reqId)
    if (done !== undefined) return done
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no access-log line for ${reqId}`)), 10_000)
      waiting.set(reqId, (l) => { clearTimeout(timer); resolve(l) })
    })
  }
  return { logger, raw, line }
}

const FIELDS = ['level', 'time', 'reqId', 'traceId', 'msg', 'ip', 'route', 'method', 'path', 'status', 'target', 'upstreamMs', 'durationMs', 'bytesIn', 'bytesOut', 'cache', 'error']
const API_KEY = 'k-SECRETAPIKEY-0123456789'
const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736'

let n = 0
const rid = (): string => `al-${process.pid}-${++n}`

async function send (url: string, opts: Parameters<typeof request>[1] = {}): Promise<{ status: number, id: string, body: Buffer }> {
  const id = rid()
  const res = await request(url, { ...opts, headers: { 'x-request-id': id, ...(opts.headers as Record<string, string> | undefined) } })
  const body = Buffer.from(await res.body.arrayBuffer())
  assert.equal(res.headers['x-request-id'], id)
  return { status: res.statusCode, id, body }
}

async function gateway (t: Parameters<typeof startGateway>[0], fixture: Omit<GatewayFixture, 'logger'>): Promise<{ url: string, log: ReturnType<typeof recorder> }> {
  const log = recorder()
  const gw = await startGateway(t, { ...fixture, logger: log.logger })
  return { url: gw.url, log }
}

test('one line per request with every field; Authorization, cookies, API keys and secret query values never appear', async (t) => {
  const up = await startUpstream(t)
  const { url, log } = await gateway(t, {
    config: { apiKeys: { keys: { tester: API_KEY } } },
    routes: {
      'al-open': { match: { prefix: '/al-open' }, upstream: { targets: [{ url: up.url }] } },
      'al-key': { match: { prefix: '/al-key' }, auth: { apiKey: true }, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const secrets = { authorization: 'Bearer SECRETBEARER.eyJzdWIiOiJ4In0.sig', cookie: 'session=SECRETCOOKIE; theme=dark', 'x-api-key': API_KEY, traceparent: `00-${TRACE}-00f067aa0ba902b7-01` }
  const query = '?id=7&token=SECRETTOKEN&api_key=SECRETQK&Password=SECRETPW&X-Amz-Signature=SECRETSIG&%74oken=SECRETENC&client_secret=SECRETCS&page=2'
  const ok = await send(`${url}/al-key/items${query}`, { headers: secrets })
  assert.equal(ok.status, 200)
  const line = await log.line(ok.id)
  assert.deepEqual(Object.keys(line).sort(), [...FIELDS, 'pid', 'hostname'].sort())
  assert.equal(line.level, 30)
  assert.equal(typeof line.time, 'number')
  assert.equal(line.msg, 'request')
  assert.equal(line.reqId, ok.id)
  assert.equal(line.traceId, TRACE)
  assert.equal(line.ip, '127.0.0.1')
  assert.equal(line.route, 'al-key')
  assert.equal(line.method, 'GET')
  assert.equal(line.path, `/al-key/items?id=7&token=${REDACTED}&api_key=${REDACTED}&Password=${REDACTED}&X-Amz-Signature=${REDACTED}&%74oken=${REDACTED}&client_secret=${REDACTED}&page=2`)
  assert.equal(line.status, 200)
  assert.equal(line.target, up.url)
  assert.equal(typeof line.upstreamMs, 'number')
  assert.ok((line.durationMs as number) >= (line.upstreamMs as number))
  assert.equal(line.bytesIn, 0)
  assert.equal(line.bytesOut, ok.body.length)
  assert.equal(line.cache, null)
  assert.equal(line.error, null)

  const refused = await send(`${url}/al-key/items?token=SECRETTOKEN2`, { headers: { ...secrets, 'x-api-key': 'k-SECRETWRONGKEY-0000' } })
  assert.equal(refused.status, 401)
  const refusedLine = await log.line(refused.id)
  assert.equal(refusedLine.error, 'GATEHOUSE_UNAUTHORIZED')
  assert.equal(refusedLine.route, 'al-key')
  assert.equal(refusedLine.target, null)
  assert.equal(refusedLine.upstreamMs, null)

  const open = await send(`${url}/al-open/x`, { headers: secrets })
  await log.line(open.id)
  const all = log.raw.join('')
  for (const secret of ['SECRET', API_KEY, 'eyJzdWIiOiJ4In0', 'theme=dark']) assert.ok(!all.includes(secret), `${secret} is not logged`)
})

test('errors the gateway makes are logged with their code, route and target', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(500, { 'content-type': 'text/plain', 'content-length': '4' })
    res.end('boom')
  })
  const hanging = await startUpstream(t, () => {})
  const closedPort = await freePort()
  const { url, log } = await gateway(t, {
    routes: {
      'al-refused': { match: { prefix: '/al-refused' }, upstream: { targets: [{ url: `http://127.0.0.1:${closedPort}` }], retries: { attempts: 0 } } },
      'al-slow': { match: { prefix: '/al-slow' }, upstream: { targets: [{ url: hanging.url }], timeouts: { response: '200ms' }, retries: { attempts: 0 } } },
      'al-ok': { match: { prefix: '/al-ok' }, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const missing = await send(`${url}/nowhere/x?secret=SECRETQ`)
  assert.equal(missing.status, 404)
  const l404 = await log.line(missing.id)
  assert.deepEqual([l404.route, l404.target, l404.upstreamMs, l404.error, l404.path], [null, null, null, 'GATEHOUSE_ROUTE_NOT_FOUND', `/nowhere/x?secret=${REDACTED}`])

  const refused = await send(`${url}/al-refused/x`)
  assert.equal(refused.status, 502)
  const l502 = await log.line(refused.id)
  assert.deepEqual([l502.route, l502.target, l502.status, l502.error], ['al-refused', `http://127.0.0.1:${closedPort}`, 502, 'GATEHOUSE_UPSTREAM_UNREACHABLE'])
  assert.equal(l502.bytesOut, refused.body.length)

  const slow = await send(`${url}/al-slow/x`)
  assert.equal(slow.status, 504)
  const l504 = await log.line(slow.id)
  assert.deepEqual([l504.route, l504.target, l504.error], ['al-slow', hanging.url, 'GATEHOUSE_UPSTREAM_TIMEOUT'])
  assert.ok((l504.durationMs as number) >= 200, 'waited for the response timeout')

  // An upstream's own error status is not a gateway error.
  const upstream500 = await send(`${url}/al-ok/x`, { method: 'DELETE' })
  assert.equal(upstream500.status, 500)
  const l = await log.line(upstream500.id)
  assert.deepEqual([l.status, l.error, l.target, l.bytesOut], [500, null, up.url, 4])
})

test('the client IP is the one trustProxy believes', async (t) => {
  const up = await startUpstream(t)
  const routes = { 'al-ip': { match: { prefix: '/al-ip' }, upstream: { targets: [{ url: up.url }] } } }
  const trusting = await gateway(t, { routes, config: { trustProxy: ['127.0.0.1/32'] } })
  const a = await send(`${trusting.url}/al-ip/x`, { headers: { 'x-forwarded-for': '198.51.100.1, 203.0.113.9' } })
  assert.equal((await trusting.log.line(a.id)).ip, '203.0.113.9')
  // A proxied body is handed to undici, which then drops the request's socket (and with it what
  // request.ip reads): the address is the same for a request with a body.
  const withBody = await send(`${trusting.url}/al-ip/x`, { method: 'POST', body: 'x'.repeat(100), headers: { 'x-forwarded-for': '203.0.113.10', 'content-type': 'text/plain' } })
  assert.equal(withBody.status, 200)
  assert.equal((await trusting.log.line(withBody.id)).ip, '203.0.113.10')
  const untrusting = await gateway(t, { routes })
  const b = await send(`${untrusting.url}/al-ip/x`, { headers: { 'x-forwarded-for': '203.0.113.9' } })
  assert.equal((await untrusting.log.line(b.id)).ip, '127.0.0.1')
})

test('bytes in and out are the body bytes, counted when there is no Content-Length', async (t) => {
  let uploaded = 0
  const up = await startUpstream(t, (req: http.IncomingMessage, res: http.ServerResponse) => {
    let size = 0
    req.on('data', (c: Buffer) => { size += c.length })
    req.on('end', () => {
      uploaded = size
      if (req.url?.startsWith('/chunked') === true) {
        // Three writes, no Content-Length: Transfer-Encoding: chunked.
        res.writeHead(200, { 'content-type': 'application/octet-stream' })
        res.write(Buffer.alloc(2000, 1))
        res.write(Buffer.alloc(2000, 2))
        res.end(Buffer.alloc(1000, 3))
      } else if (req.url?.startsWith('/big') === true) {
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '5000' })
        res.end('a'.repeat(5000))
      } else {
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '5' })
        res.end(req.method === 'HEAD' ? undefined : 'hello')
      }
    })
  })
  const { url, log } = await gateway(t, { routes: { 'al-bytes': { match: { prefix: '/al-bytes' }, upstream: { targets: [{ url: up.url }] } } } })

  const fixed = await send(`${url}/al-bytes/fixed`, { method: 'POST', body: Buffer.alloc(1000, 7), headers: { 'content-type': 'application/octet-stream' } })
  const lf = await log.line(fixed.id)
  assert.deepEqual([lf.bytesIn, lf.bytesOut, uploaded], [1000, 5, 1000])

  const chunks = [Buffer.alloc(1500, 1), Buffer.alloc(1500, 2)]
  const streamed = await send(`${url}/al-bytes/chunked`, { method: 'POST', body: Readable.from(chunks), headers: { 'content-type': 'application/octet-stream' } })
  assert.equal(streamed.status, 200)
  assert.equal(streamed.body.length, 5000)
  const ls = await log.line(streamed.id)
  assert.deepEqual([ls.bytesIn, ls.bytesOut, uploaded], [3000, 5000, 3000])

  const head = await send(`${url}/al-bytes/fixed`, { method: 'HEAD' })
  const lh = await log.line(head.id)
  assert.deepEqual([lh.method, lh.bytesIn, lh.bytesOut], ['HEAD', 0, 0])

  // Compressed on the way out: the bytes the client got, not the upstream's Content-Length.
  const gz = await send(`${url}/al-bytes/big`, { headers: { 'accept-encoding': 'gzip' } })
  assert.ok(gz.body.length > 0 && gz.body.length < 5000, `compressed to ${gz.body.length} bytes`)
  assert.equal((await log.line(gz.id)).bytesOut, gz.body.length)
})

test('the cache result comes from X-Cache', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'public, max-age=60', 'content-length': '2' })
    res.end('ok')
  })
  const { url, log } = await gateway(t, { routes: { 'al-cache': { match: { prefix: '/al-cache' }, cache: { enabled: true }, upstream: { targets: [{ url: up.url }] } } } })
  const miss = await send(`${url}/al-cache/x`)
  const hit = await send(`${url}/al-cache/x`)
  assert.equal((await log.line(miss.id)).cache, 'MISS')
  const lh = await log.line(hit.id)
  assert.equal(lh.cache, 'HIT')
  assert.equal(lh.target, null, 'a hit never reached an upstream')
})

test('logging.accessLog: false writes no request lines', async (t) => {
  const up = await startUpstream(t)
  const { url, log } = await gateway(t, { config: { logging: { accessLog: false } }, routes: { 'al-off': { match: { prefix: '/al-off' }, upstream: { targets: [{ url: up.url }] } } } })
  const r = await send(`${url}/al-off/x`)
  assert.equal(r.status, 200)
  // A request that is logged proves lines flow; none of them is an access line.
  const missing = await send(`${url}/nowhere`)
  assert.equal(missing.status, 404)
  assert.ok(!log.raw.some((l) => l.includes('"msg":"request"')))
})

test('redactPath keeps names and order, redacts secret-looking values, and bounds the length', () => {
  assert.equal(redactPath('/a/b'), '/a/b')
  assert.equal(redactPath('/a?x=1&y=2'), '/a?x=1&y=2')
  assert.equal(redactPath('/a?access_token=abc&flag&sig=1&AUTH=z&user=bob'), `/a?access_token=${REDACTED}&flag&sig=${REDACTED}&AUTH=${REDACTED}&user=bob`)
  assert.equal(redactPath('/a?%70assword=x&code=oauth&state=s'), `/a?%70assword=${REDACTED}&code=${REDACTED}&state=${REDACTED}`)
  assert.equal(redactPath('/a?bad%ZZname=1'), '/a?bad%ZZname=1')
  assert.equal(redactPath('/a?x-consumer=1', /^x.consumer$/i), `/a?x-consumer=${REDACTED}`)
  const long = redactPath('/' + 'a'.repeat(10_000))
  assert.equal(long.length, MAX_PATH + 3)
})

test('a client that leaves before its response is logged once, as 499, over HTTP/1.1 and HTTP/2', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const arrivals: Array<() => void> = []
  const up = await startUpstream(t, (req) => {
    req.on('error', () => {})
    arrivals.shift()?.()
  })
  const { url, log } = await gateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile } },
    routes: { 'al-hang': { match: { prefix: '/al-hang' }, upstream: { targets: [{ url: up.url }], timeouts: { response: '30s' }, retries: { attempts: 0 } } } }
  })
  const arrived = async (): Promise<void> => { await new Promise<void>((resolve) => arrivals.push(resolve)) }
  const base = url.replace(/^http:/, 'https:')
  const agent = new Agent({ connect: { ca: ca.ca } })
  t.after(async () => { await agent.close() })

  const h1 = rid()
  const ac = new AbortController()
  const upstreamSaw = arrived()
  const pending = request(`${base}/al-hang/h1`, { signal: ac.signal, headers: { 'x-request-id': h1 }, dispatcher: agent }).catch((err: Error) => err)
  await upstreamSaw
  ac.abort()
  assert.ok(await pending instanceof Error)
  const l1 = await log.line(h1)
  assert.deepEqual([l1.status, l1.route, l1.target, l1.bytesOut], [499, 'al-hang', up.url, null])
  assert.equal(l1.ip, '127.0.0.1')

  const session = http2.connect(base, { ca: ca.ca })
  t.after(() => session.destroy())
  await once(session, 'connect')
  const h2 = rid()
  const reached = arrived()
  const stream = session.request({ ':path': '/al-hang/h2', 'x-request-id': h2 })
  stream.on('error', () => {})
  await reached
  stream.close(http2.constants.NGHTTP2_CANCEL)
  const l2 = await log.line(h2)
  assert.deepEqual([l2.status, l2.route, l2.target], [499, 'al-hang', up.url])
  const mine = log.raw.filter((l) => l.includes(`"reqId":"${h1}"`) || l.includes(`"reqId":"${h2}"`))
  assert.equal(mine.filter((l) => l.includes('"msg":"request"')).length, 2, 'one access line each: ' + mine.join(''))
})
