import { test } from 'node:test'
import assert from 'node:assert/strict'
import http2 from 'node:http2'
import { createHash, randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { gunzipSync } from 'node:zlib'
import { startGateway, startUpstream, type TestGateway } from './helper.js'
import { createCa, type TestCa } from './certs.js'
import { metrics } from '../src/metrics.js'

interface H2Response {
  status: number
  headers: http2.IncomingHttpHeaders
  body: Buffer
}

async function h2request (session: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders, body?: Buffer): Promise<H2Response> {
  const stream = session.request(headers, { endStream: body === undefined })
  if (body !== undefined) stream.end(body)
  const [responseHeaders] = await once(stream, 'response') as [http2.IncomingHttpHeaders]
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return { status: Number(responseHeaders[':status']), headers: responseHeaders, body: Buffer.concat(chunks) }
}

async function connectH2 (t: { after: (fn: () => unknown) => void }, gw: TestGateway, ca: TestCa): Promise<http2.ClientHttp2Session> {
  const session = http2.connect(`https://127.0.0.1:${gw.port}`, { ca: ca.ca })
  t.after(() => session.destroy())
  await once(session, 'connect')
  return session
}

/** Node's HTTP/1 upstream sends Connection and Keep-Alive; none of it may reach an HTTP/2 client. */
const CONNECTION_SPECIFIC = ['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade']

test('HTTP/2 (ALPN h2) through routing: path, query, forwarded headers, streamed upload, concurrent streams; no connection-specific headers', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const up = await startUpstream(t, (req, res) => {
    const hash = createHash('sha256')
    let bytes = 0
    req.on('data', (c: Buffer) => { hash.update(c); bytes += c.length })
    req.on('end', () => {
      const body = JSON.stringify({ method: req.method, url: req.url, headers: req.headers, bytes, sha256: hash.digest('hex') })
      res.writeHead(200, { 'content-type': 'application/json', 'keep-alive': 'timeout=5', connection: 'keep-alive' })
      res.end(body)
    })
  })
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile } },
    routes: {
      svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } },
      keep: { match: { prefix: '/keep' }, preserveHost: true, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const session = await connectH2(t, gw, ca)
  assert.equal(session.alpnProtocol, 'h2')

  const res = await h2request(session, { ':path': '/svc/a/b?x=1&y=%20z', ':authority': 'api.example.com', 'x-custom': 'kept' })
  assert.equal(res.status, 200)
  for (const h of CONNECTION_SPECIFIC) assert.equal(res.headers[h], undefined, `${h} is not sent over HTTP/2`)
  assert.ok(res.headers['x-request-id'])
  const seen = JSON.parse(res.body.toString()) as { url: string, headers: Record<string, string> }
  assert.equal(seen.url, '/a/b?x=1&y=%20z')
  assert.equal(seen.headers['x-forwarded-proto'], 'https')
  assert.equal(seen.headers['x-forwarded-host'], 'api.example.com')
  assert.equal(seen.headers.host, `127.0.0.1:${up.port}`)
  assert.equal(seen.headers['x-custom'], 'kept')
  for (const name of Object.keys(seen.headers)) assert.ok(!name.startsWith(':'), `pseudo-header ${name} is not forwarded`)

  // preserveHost sends the client's :authority as Host.
  const preserved = await h2request(session, { ':path': '/keep/x', ':authority': 'api.example.com' })
  assert.equal((JSON.parse(preserved.body.toString()) as { headers: Record<string, string> }).headers.host, 'api.example.com')

  // A 2 MiB upload arrives whole, streamed to the upstream.
  const upload = randomBytes(2 * 1024 * 1024)
  const posted = await h2request(session, { ':method': 'POST', ':path': '/svc/upload', 'content-type': 'application/octet-stream' }, upload)
  assert.equal(posted.status, 200)
  const got = JSON.parse(posted.body.toString()) as { bytes: number, sha256: string }
  assert.equal(got.bytes, upload.length)
  assert.equal(got.sha256, createHash('sha256').update(upload).digest('hex'))

  // Many streams on one connection.
  const many = await Promise.all(Array.from({ length: 20 }, async (_v, i) => await h2request(session, { ':path': `/svc/n/${i}` })))
  assert.deepEqual(many.map((r) => r.status), Array(20).fill(200))
  assert.deepEqual(many.map((r) => (JSON.parse(r.body.toString()) as { url: string }).url), Array.from({ length: 20 }, (_v, i) => `/n/${i}`))
})

test('HTTP/2 errors are problem+json: no route (404), unreachable upstream (502 with Proxy-Status), without internal addresses', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const gone = await startUpstream(t)
  await gone.close()
  const gw = await startGateway(t, { config: { tls: { cert: leaf.certFile, key: leaf.keyFile } }, routes: { down: { match: { prefix: '/down' }, upstream: { targets: [{ url: gone.url }] } } } })
  const session = await connectH2(t, gw, ca)

  const missing = await h2request(session, { ':path': '/nowhere' })
  assert.equal(missing.status, 404)
  assert.match(String(missing.headers['content-type']), /^application\/problem\+json/)
  const p404 = JSON.parse(missing.body.toString()) as { code: string, requestId: string }
  assert.equal(p404.code, 'GATEHOUSE_ROUTE_NOT_FOUND')
  assert.equal(p404.requestId, missing.headers['x-request-id'])

  const down = await h2request(session, { ':path': '/down/x' })
  assert.equal(down.status, 502)
  assert.match(String(down.headers['content-type']), /^application\/problem\+json/)
  assert.equal(down.headers['proxy-status'], 'gatehouse; error=connection_refused')
  assert.equal((JSON.parse(down.body.toString()) as { code: string }).code, 'GATEHOUSE_UPSTREAM_UNREACHABLE')
  assert.ok(!down.body.toString().includes(String(gone.port)), 'no internal address in the answer')
  // The session survives the errors.
  assert.equal((await h2request(session, { ':path': '/nowhere' })).status, 404)
})

test('HTTP/2 through the concerns: API-key auth, rate limit, compression, response cache, HSTS, metrics', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const payload = JSON.stringify({ items: Array.from({ length: 200 }, (_v, i) => ({ id: i, name: `item ${i}` })) })
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'public, max-age=60' })
    res.end(payload)
  })
  const key = 'h2-test-key-0123456789'
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile }, apiKeys: { keys: { client: key } } },
    routes: {
      private: { match: { prefix: '/private' }, auth: { apiKey: true }, upstream: { targets: [{ url: up.url }] } },
      limited: { match: { prefix: '/limited' }, rateLimit: { max: 2, window: '1m' }, upstream: { targets: [{ url: up.url }] } },
      cached: { match: { prefix: '/cached' }, cache: { enabled: true }, compress: true, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const session = await connectH2(t, gw, ca)

  const anonymous = await h2request(session, { ':path': '/private/x' })
  assert.equal(anonymous.status, 401)
  assert.equal((JSON.parse(anonymous.body.toString()) as { code: string }).code, 'GATEHOUSE_UNAUTHORIZED')
  const authed = await h2request(session, { ':path': '/private/x', 'x-api-key': key })
  assert.equal(authed.status, 200)

  assert.equal((await h2request(session, { ':path': '/limited/a' })).status, 200)
  assert.equal((await h2request(session, { ':path': '/limited/a' })).status, 200)
  const limited = await h2request(session, { ':path': '/limited/a' })
  assert.equal(limited.status, 429)
  assert.ok(Number(limited.headers['retry-after']) > 0)

  const first = await h2request(session, { ':path': '/cached/list', 'accept-encoding': 'gzip' })
  assert.equal(first.status, 200)
  assert.equal(first.headers['content-encoding'], 'gzip')
  assert.equal(gunzipSync(first.body).toString(), payload)
  assert.equal(first.headers['x-cache'], 'MISS')
  const second = await h2request(session, { ':path': '/cached/list', 'accept-encoding': 'gzip' })
  assert.equal(second.headers['x-cache'], 'HIT')
  assert.equal(gunzipSync(second.body).toString(), payload)
  assert.match(String(first.headers['strict-transport-security']), /max-age=\d+/)

  const upstreamCalls = up.received.filter((r) => r.url === '/list').length
  assert.equal(upstreamCalls, 1, 'the cache answered the second request')

  // Metrics count HTTP/2 requests like any other.
  const { values } = await metrics.requests.get()
  const count = (route: string, status: string): number | undefined => values.find((v) => v.labels.route === route && v.labels.status === status)?.value
  assert.equal(count('private', '401'), 1)
  assert.equal(count('limited', '429'), 1)
  assert.equal(count('cached', '200'), 2)
})

test('HTTP/2: a header block past limits.maxHeaderBytes is refused (431 problem, or a stream reset), never forwarded; the session goes on', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile }, limits: { maxHeaderBytes: '4KiB' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const session = await connectH2(t, gw, ca)
  // nghttp2 resets such a stream once the client has acknowledged the gateway's SETTINGS; before
  // that (the first requests of a connection) the gateway measures the block itself: 431.
  const outcomes: string[] = []
  for (let i = 0; i < 3; i++) {
    const stream = session.request({ ':path': '/svc/big', 'x-big': 'a'.repeat(8000) })
    stream.on('error', () => {})
    let status: unknown
    let body = ''
    stream.on('response', (h) => { status = h[':status'] })
    stream.on('data', (c: Buffer) => { body += c.toString() })
    // (once() would reject on the reset's 'error' event.)
    await new Promise((resolve) => stream.on('close', resolve))
    if (status === 431) {
      assert.equal((JSON.parse(body) as { code: string }).code, 'GATEHOUSE_HEADERS_TOO_LARGE')
      outcomes.push('431')
    } else {
      assert.equal(stream.rstCode, http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
      outcomes.push('reset')
    }
  }
  t.diagnostic(`oversized header blocks: ${outcomes.join(', ')}`)
  assert.equal(up.received.length, 0)
  assert.equal((await h2request(session, { ':path': '/svc/small', 'x-small': 'a'.repeat(1000) })).status, 200)
})
