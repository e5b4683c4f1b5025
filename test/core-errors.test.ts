import { test } from 'node:test'
import assert from 'node:assert/strict'
import net from 'node:net'
import { once } from 'node:events'
import { Readable, Writable } from 'node:stream'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { stringify } from 'yaml'
import type { IncomingMessage } from 'node:http'
import { request } from 'undici'
import { freePort, startGateway, startUpstream } from './helper.js'
import { call, parseResponse, rawCall, route, until } from './core-helper.js'
import { GatewayServer } from '../src/server.js'

interface Problem { type: string, title: string, status: number, detail: string, code: string, requestId: string }

/** What no gateway-made error body may contain: internal addresses, ports, socket error texts, stacks. */
function assertNoLeak (text: string, port: number): void {
  for (const bad of ['127.0.0.1', String(port), 'ECONNREFUSED', 'ECONNRESET', 'socket', 'undici', ' at ', 'Error:']) {
    assert.ok(!text.includes(bad), `error body leaks ${JSON.stringify(bad)}: ${text}`)
  }
}

test('502 GATEHOUSE_UPSTREAM_UNREACHABLE when the target refuses, with Proxy-Status and no internal detail', async (t) => {
  const port = await freePort()
  const gw = await startGateway(t, { routes: { svc: route('/svc', `http://127.0.0.1:${port}`, { upstream: { retries: { attempts: 0 } } }) } })
  const res = await call(`${gw.url}/svc/a`)
  assert.equal(res.status, 502)
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/)
  assert.equal(res.headers['proxy-status'], 'gatehouse; error=connection_refused')
  const body = res.json<Problem>()
  assert.equal(body.code, 'GATEHOUSE_UPSTREAM_UNREACHABLE')
  assert.equal(body.status, 502)
  assert.equal(body.type, 'urn:gatehouse:error:upstream-unreachable')
  assert.equal(body.requestId, res.headers['x-request-id'])
  assertNoLeak(res.text, port)
})

test('502 GATEHOUSE_UPSTREAM_RESET when the upstream resets before responding', async (t) => {
  const up = await startUpstream(t, (req) => { req.socket.destroy() })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { upstream: { retries: { attempts: 0 } } }) } })
  const res = await call(`${gw.url}/svc/a`, { method: 'POST', body: 'x' })
  assert.equal(res.status, 502)
  assert.equal(res.headers['proxy-status'], 'gatehouse; error=connection_terminated')
  assert.equal(res.json<Problem>().code, 'GATEHOUSE_UPSTREAM_RESET')
  assertNoLeak(res.text, up.port)
})

test('504 GATEHOUSE_UPSTREAM_TIMEOUT after timeouts.response with a hanging upstream', async (t) => {
  const held: IncomingMessage[] = []
  const up = await startUpstream(t, (req) => { held.push(req) })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { upstream: { timeouts: { response: '300ms' }, retries: { attempts: 0 } } }) } })
  const started = Date.now()
  const res = await call(`${gw.url}/svc/slow`)
  assert.equal(res.status, 504)
  assert.ok(Date.now() - started >= 250, 'not before the timeout')
  assert.equal(res.headers['proxy-status'], 'gatehouse; error=http_response_timeout')
  const body = res.json<Problem>()
  assert.equal(body.code, 'GATEHOUSE_UPSTREAM_TIMEOUT')
  assert.equal(body.title, 'Gateway Timeout')
  assertNoLeak(res.text, up.port)
  assert.equal(held.length, 1)
})

test('413 for a Content-Length over the route bodyLimit: nothing is forwarded', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { bodyLimit: '1KiB' }) } })
  const res = await rawCall(gw.port, ['POST /svc/a HTTP/1.1', 'Host: gw.test', 'Content-Length: 2048', 'Content-Type: application/octet-stream'], 'x'.repeat(2048))
  assert.equal(res.status, 413)
  assert.match(res.header('content-type') ?? '', /^application\/problem\+json/)
  assert.equal(JSON.parse(res.body).code, 'GATEHOUSE_PAYLOAD_TOO_LARGE')
  assert.equal(up.received.length, 0)

  const ok = await call(`${gw.url}/svc/a`, { method: 'POST', body: 'y'.repeat(1024) })
  assert.equal(ok.status, 200, 'a body of exactly the limit passes')
})

test('413 for a chunked body over the limit, counted as it streams: the upstream never gets it whole', async (t) => {
  const bodies: Array<{ bytes: number, complete: boolean }> = []
  const up = await startUpstream(t, (req, res) => {
    const seen = { bytes: 0, complete: false }
    bodies.push(seen)
    req.on('data', (c: Buffer) => { seen.bytes += c.length })
    req.on('end', () => { seen.complete = true; res.end('got it') })
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { bodyLimit: '64KiB' }) } })
  const chunk = Buffer.alloc(16 * 1024, 'z')
  async function * body (): AsyncGenerator<Buffer> {
    for (let i = 0; i < 16; i++) yield chunk // 256 KiB, four times the limit
  }
  let status: number | undefined
  let text = ''
  try {
    const res = await request(`${gw.url}/svc/upload`, { method: 'POST', body: Readable.from(body()), headers: { 'content-type': 'application/octet-stream' } })
    status = res.statusCode
    text = await res.body.text()
  } catch (err) {
    // The gateway may close the connection while the client is still sending; the raw check below covers the status.
    assert.match((err as NodeJS.ErrnoException).code ?? '', /ECONNRESET|EPIPE|UND_ERR_SOCKET/)
  }
  if (status !== undefined) {
    assert.equal(status, 413)
    assert.equal(JSON.parse(text).code, 'GATEHOUSE_PAYLOAD_TOO_LARGE')
  }
  // Raw: the whole over-limit chunked body is sent first, then the answer is read.
  const raw = net.connect(gw.port, '127.0.0.1')
  await once(raw, 'connect')
  const received: Buffer[] = []
  raw.on('data', (c: Buffer) => received.push(c))
  raw.on('error', () => {})
  raw.write('POST /svc/upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n')
  for (let i = 0; i < 8; i++) raw.write(`${chunk.length.toString(16)}\r\n${chunk.toString()}\r\n`)
  raw.write('0\r\n\r\n')
  await once(raw, 'close')
  const answer = parseResponse(Buffer.concat(received).toString('latin1'))
  assert.equal(answer.status, 413)
  assert.equal(JSON.parse(answer.body).code, 'GATEHOUSE_PAYLOAD_TOO_LARGE')
  for (const b of bodies) {
    assert.equal(b.complete, false, 'the upstream never saw the end of an over-limit body')
    assert.ok(b.bytes <= 64 * 1024, `at most the limit was forwarded (${b.bytes})`)
  }
})

test('431 problem+json for an oversized header block', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { config: { limits: { maxHeaderBytes: '8KiB' } }, routes: { svc: route('/svc', up.url) } })
  const res = await rawCall(gw.port, ['GET /svc/a HTTP/1.1', 'Host: gw.test', `X-Big: ${'b'.repeat(10 * 1024)}`])
  assert.equal(res.status, 431)
  assert.match(res.header('content-type') ?? '', /^application\/problem\+json/)
  assert.equal(JSON.parse(res.body).code, 'GATEHOUSE_HEADERS_TOO_LARGE')
  assert.equal(up.received.length, 0)
  // Under the limit passes.
  assert.equal((await rawCall(gw.port, ['GET /svc/a HTTP/1.1', 'Host: gw.test', `X-Big: ${'b'.repeat(4 * 1024)}`])).status, 200)
})

test('an upstream that resets mid-body gives the client an aborted response, never a complete-looking one', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    if (req.url === '/chunked') res.writeHead(200, { 'content-type': 'text/plain' })
    else res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '100000' })
    res.write('x'.repeat(1000), () => { setImmediate(() => res.socket?.destroy()) })
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })

  for (const path of ['/svc/chunked', '/svc/length']) {
    const res = await request(`${gw.url}${path}`)
    assert.equal(res.statusCode, 200)
    await assert.rejects(res.body.text(), path)
  }
  // On the wire: a chunked response is never closed by its terminating zero-length chunk.
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  const chunks: Buffer[] = []
  sock.on('data', (c: Buffer) => chunks.push(c))
  sock.on('error', () => {})
  sock.write('GET /svc/chunked HTTP/1.1\r\nHost: gw.test\r\n\r\n')
  await once(sock, 'close')
  const raw = Buffer.concat(chunks).toString('latin1')
  assert.match(raw, /^HTTP\/1\.1 200/)
  assert.ok(raw.includes('x'.repeat(100)), 'part of the body came through')
  assert.ok(!raw.endsWith('0\r\n\r\n'), 'no terminating chunk')
})

test('the gateway closes a connection whose header block is not complete within headersTimeout', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { config: { limits: { headersTimeout: '1s', requestTimeout: '2s' } }, routes: { svc: route('/svc', up.url) } })
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  const chunks: Buffer[] = []
  sock.on('data', (c: Buffer) => chunks.push(c))
  sock.on('error', () => {})
  sock.write('GET /svc/a HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ')
  const started = Date.now()
  await once(sock, 'close')
  const elapsed = Date.now() - started
  // Node's default check interval (30 s) would let it hang on far longer than headersTimeout.
  assert.ok(elapsed < 10_000, `dropped within the bound (${elapsed} ms)`)
  const raw = Buffer.concat(chunks).toString('latin1')
  if (raw !== '') assert.match(raw, /^HTTP\/1\.1 408/)
  assert.equal(up.received.length, 0)
})

test('logs of a failed upstream request carry no secret: no Authorization, cookie, API key or token value', async (t) => {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-logs-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'routes'))
  writeFileSync(join(dir, 'routes', 'svc.yaml'), stringify(route('/svc', `http://127.0.0.1:${port}`, { upstream: { retries: { attempts: 0 } } })))
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify({ listen: { host: '127.0.0.1', port: 0 }, admin: false, routes: './routes' }))
  let logs = ''
  const sink = new Writable({ write (chunk: Buffer, _enc, cb) { logs += chunk.toString(); cb() } })
  const gateway = new GatewayServer({ configFile: join(dir, 'gatehouse.yaml'), logger: pino({ level: 'trace' }, sink) })
  await gateway.start()
  t.after(async () => { await gateway.close() })
  const secrets = ['Bearer-s3cr3t-jwt', 'sess-c00kie-value', 'ak-0123456789-key', 'tok-in-query-42']
  const res = await call(`http://127.0.0.1:${gateway.address().port}/svc/a?access_token=${secrets[3]}`, {
    headers: { authorization: `Bearer ${secrets[0]}`, cookie: `session=${secrets[1]}`, 'x-api-key': secrets[2] }
  })
  assert.equal(res.status, 502)
  // Access lines are written in batches (within 100 ms).
  await until(() => logs.includes('GATEHOUSE_UPSTREAM_UNREACHABLE') ? true : undefined, 2000)
  for (const secret of secrets) assert.ok(!logs.includes(secret), `logs leak ${secret}`)
})

test('an error thrown inside a route plugin is a 500 problem without its message or stack', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  writeFileSync(join(gw.routesDir, 'boom.js'), `module.exports = {
    match: { prefix: '/boom' },
    upstream: { targets: [{ url: '${up.url}' }] },
    plugin: async (fastify) => {
      fastify.addHook('onRequest', async () => { throw new Error('db password=hunter2 at 10.1.2.3:5432') })
    }
  }\n`)
  assert.equal((await gw.gateway.reload()).ok, true)
  const res = await call(`${gw.url}/boom/x`)
  assert.equal(res.status, 500)
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/)
  const body = res.json<Problem>()
  assert.equal(body.code, 'GATEHOUSE_INTERNAL')
  for (const bad of ['hunter2', 'password', '10.1.2.3', 'boom.js', '    at ']) assert.ok(!res.text.includes(bad), `leaks ${bad}: ${res.text}`)
  assert.equal(up.received.length, 0)
})

test('request smuggling shapes are refused before routing: Content-Length with Transfer-Encoding, two lengths', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const both = await rawCall(gw.port, ['POST /svc/a HTTP/1.1', 'Host: gw.test', 'Content-Length: 4', 'Transfer-Encoding: chunked'], '0\r\n\r\nGET /svc/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n')
  assert.equal(both.status, 400)
  assert.equal(JSON.parse(both.body).code, 'GATEHOUSE_BAD_REQUEST')
  const two = await rawCall(gw.port, ['POST /svc/a HTTP/1.1', 'Host: gw.test', 'Content-Length: 1', 'Content-Length: 40'], 'x')
  assert.equal(two.status, 400)
  assert.equal(up.received.length, 0, 'nothing reached the upstream')
})

test('Expect: 100-continue uploads (curl sends it above 1 MiB) are answered 100 and forwarded without Expect', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    let n = 0
    req.on('data', (c: Buffer) => { n += c.length })
    req.on('end', () => res.end(JSON.stringify({ n, expect: req.headers.expect ?? null })))
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  let received = ''
  sock.on('data', (c: Buffer) => { received += c.toString('latin1') })
  sock.write('PUT /svc/file HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n')
  await once(sock, 'data')
  assert.match(received, /^HTTP\/1\.1 100 Continue\r\n\r\n/)
  sock.write('hello')
  await once(sock, 'close')
  const final = parseResponse(received.slice(received.indexOf('\r\n\r\n') + 4))
  assert.equal(final.status, 200)
  assert.deepEqual(JSON.parse(final.body), { n: 5, expect: null })
})

test('an upstream\'s own 503 (or 500) is relayed once, as the upstream sent it, without Proxy-Status', async (t) => {
  const busy = await startUpstream(t, (_req, res) => {
    res.writeHead(503, { 'retry-after': '1', 'content-type': 'text/plain' })
    res.end('upstream busy')
  })
  const broken = await startUpstream(t, (_req, res) => {
    res.writeHead(500, { 'content-type': 'text/plain' })
    res.end('upstream broken')
  })
  const gw = await startGateway(t, { routes: { busy: route('/busy', busy.url), broken: route('/broken', broken.url) } })
  const b = await call(`${gw.url}/busy/x`)
  assert.equal(b.status, 503)
  assert.equal(b.text, 'upstream busy')
  assert.equal(b.headers['retry-after'], '1')
  assert.equal(b.headers['proxy-status'], undefined, 'not a gateway error')
  const e = await call(`${gw.url}/broken/x`)
  assert.equal(e.status, 500)
  assert.equal(e.text, 'upstream broken')
  assert.equal(e.headers['proxy-status'], undefined)
  // reply-from retries a GET answered 503 up to 10 times by default (PITFALLS.md): not here.
  assert.equal(busy.received.length, 1)
  assert.equal(broken.received.length, 1)
})
