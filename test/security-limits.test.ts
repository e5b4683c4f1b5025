import { test } from 'node:test'
import assert from 'node:assert/strict'
import net from 'node:net'
import { once } from 'node:events'
import { request } from 'undici'
import { rawRequest, startGateway, startUpstream } from './helper.js'

async function connect (port: number): Promise<net.Socket> {
  const socket = net.connect(port, '127.0.0.1')
  await once(socket, 'connect')
  return socket
}

test('body over the limit: 413 before anything is forwarded (declared length and chunked); headers over the limit: 431', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { limits: { bodyLimit: '1KiB', maxHeaderBytes: '2KiB' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const big = 'x'.repeat(4096)
  const declared = await request(`${gw.url}/svc/upload`, { method: 'POST', body: big })
  assert.equal(declared.statusCode, 413)
  assert.equal((await declared.body.json() as { code: string }).code, 'GATEHOUSE_PAYLOAD_TOO_LARGE')
  assert.equal(up.received.length, 0)

  const chunked = await rawRequest(gw.port, `POST /svc/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${(4096).toString(16)}\r\n${big}\r\n0\r\n\r\n`)
  assert.match(chunked, /^HTTP\/1\.1 413 /)

  const small = await request(`${gw.url}/svc/upload`, { method: 'POST', body: 'x'.repeat(512) })
  assert.equal(small.statusCode, 200)
  await small.body.dump()

  const headers = await rawRequest(gw.port, `GET /svc HTTP/1.1\r\nHost: x\r\nX-Big: ${'y'.repeat(4096)}\r\n\r\n`)
  assert.match(headers, /^HTTP\/1\.1 431 /)
  assert.match(headers, /GATEHOUSE_HEADERS_TOO_LARGE/)
})

test('slowloris: a connection that never finishes its headers is closed within headersTimeout while normal traffic flows', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { limits: { headersTimeout: '1s', requestTimeout: '2s' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const slow = await connect(gw.port)
  t.after(() => slow.destroy())
  const closed = once(slow, 'close')
  // Read what the server sends (its 408), so that its closing is seen; drip writes may hit EPIPE.
  const answer: Buffer[] = []
  slow.on('data', (d: Buffer) => answer.push(d))
  slow.on('error', () => {})
  const started = performance.now()
  slow.write('GET /svc HTTP/1.1\r\nHost: x\r\n')
  // One more header line every 300 ms: the connection is never idle, yet never done.
  const drip = setInterval(() => { if (slow.writable) slow.write(`X-Drip-${Date.now()}: 1\r\n`) }, 300)
  t.after(() => clearInterval(drip))
  let served = 0
  while (slow.readyState === 'open' && performance.now() - started < 10_000) {
    const res = await request(`${gw.url}/svc/ok`)
    await res.body.dump()
    assert.equal(res.statusCode, 200)
    served++
  }
  await closed
  clearInterval(drip)
  const elapsed = performance.now() - started
  // headersTimeout 1 s, checked every second by the server: closed well before 1 s + 1 s + slack.
  assert.ok(elapsed < 6000, `slow connection lived ${Math.round(elapsed)} ms`)
  assert.ok(served > 0, 'normal requests were served meanwhile')
  assert.match(Buffer.concat(answer).toString(), /^HTTP\/1\.1 408 /)
})

test('maxConcurrent: requests past the cap get 503 with Retry-After at once; capacity comes back', async (t) => {
  const held: Array<() => void> = []
  let arrived!: () => void
  let waiting = 2
  const bothArrived = new Promise<void>((resolve) => { arrived = resolve })
  const up = await startUpstream(t, (req, res) => {
    if (req.url === '/slow') {
      held.push(() => res.end('slow'))
      if (--waiting === 0) arrived()
    } else res.end('fast')
  })
  const gw = await startGateway(t, {
    config: { limits: { maxConcurrent: 2 } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const slow = [request(`${gw.url}/svc/slow`), request(`${gw.url}/svc/slow`)]
  await bothArrived
  const refused = await request(`${gw.url}/svc/fast`)
  assert.equal(refused.statusCode, 503)
  assert.equal(refused.headers['retry-after'], '5')
  assert.equal((await refused.body.json() as { code: string }).code, 'GATEHOUSE_OVERLOADED')
  for (const release of held) release()
  for (const r of await Promise.all(slow)) {
    assert.equal(r.statusCode, 200)
    await r.body.dump()
  }
  const ok = await request(`${gw.url}/svc/fast`)
  assert.equal(ok.statusCode, 200)
  await ok.body.dump()
})

test('maxConnectionsPerIp: one connection too many is closed before a byte is read', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { limits: { maxConnectionsPerIp: 2 } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const a = await connect(gw.port)
  const b = await connect(gw.port)
  t.after(() => { a.destroy(); b.destroy() })
  const c = await connect(gw.port)
  const data: Buffer[] = []
  c.on('data', (d: Buffer) => data.push(d))
  c.on('error', () => {})
  c.write('GET /svc HTTP/1.1\r\nHost: x\r\n\r\n')
  await once(c, 'close')
  assert.equal(data.length, 0)
  // The two open ones still work, and a freed slot is usable again.
  a.write('GET /svc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  const answer: Buffer[] = []
  a.on('data', (d: Buffer) => answer.push(d))
  await once(a, 'close')
  assert.match(Buffer.concat(answer).toString(), /^HTTP\/1\.1 200 /)
  const d = await rawRequest(gw.port, 'GET /svc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  assert.match(d, /^HTTP\/1\.1 200 /)
  assert.equal(up.received.length, 2)
})

test('maxEventLoopDelay: while the event loop lags, @fastify/under-pressure sheds load with 503 + Retry-After; then it recovers', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { limits: { maxEventLoopDelay: '200ms' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const call = async () => {
    const res = await request(`${gw.url}/svc`)
    const body = await res.body.text()
    return { status: res.statusCode, retry: res.headers['retry-after'], body }
  }
  assert.equal((await call()).status, 200)
  // Block the loop (the gateway runs in this process) well past the threshold.
  const until = performance.now() + 1500
  while (performance.now() < until);
  const deadline = performance.now() + 10_000
  let shed: Awaited<ReturnType<typeof call>> | undefined
  while (shed === undefined && performance.now() < deadline) {
    const r = await call()
    if (r.status === 503) shed = r
  }
  assert.ok(shed !== undefined, 'no request was shed while the loop lagged')
  assert.equal(shed.retry, '5')
  assert.match(shed.body, /GATEHOUSE_OVERLOADED/)
  let recovered = false
  while (!recovered && performance.now() < deadline + 10_000) recovered = (await call()).status === 200
  assert.ok(recovered)
})
