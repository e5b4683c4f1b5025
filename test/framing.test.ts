import { test } from 'node:test'
import assert from 'node:assert/strict'
import net from 'node:net'
import { once } from 'node:events'
import { rawRequest, startGateway, startUpstream } from './helper.js'

/*
 * Request smuggling guards, over raw sockets: a request whose framing two HTTP parsers could read
 * differently is refused with 400 by the gateway and never reaches the upstream. Each case is
 * followed, on the same connection, by a smuggled second request that must not come through.
 */

const SMUGGLED = 'GET /svc/smuggled HTTP/1.1\r\nHost: x\r\n\r\n'

const cases: Array<[string, string]> = [
  ['Content-Length with Transfer-Encoding', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'],
  ['Transfer-Encoding with Content-Length (reversed order)', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n'],
  ['two differing Content-Length headers', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd'],
  ['a Content-Length list', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 40\r\n\r\nabcd'],
  ['a malformed chunk size', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabcd\r\n0\r\n\r\n'],
  ['a chunk longer than its size', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n'],
  ['Transfer-Encoding not ending in chunked', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n'],
  ['an obfuscated Transfer-Encoding', 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n'],
  ['a bare LF line ending in the head', 'POST /svc/a HTTP/1.1\r\nHost: x\nContent-Length: 0\r\n\r\n'],
  ['a space before the header colon', 'GET /svc/a HTTP/1.1\r\nHost : x\r\n\r\n']
]

test('ambiguous framing is refused with 400 and nothing reaches the upstream', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  for (const [name, head] of cases) {
    const answer = await rawRequest(gw.port, head + SMUGGLED)
    assert.match(answer, /^HTTP\/1\.1 400 /, `${name}: ${answer.slice(0, 80)}`)
    assert.equal(answer.match(/HTTP\/1\.1 /g)?.length, 1, `${name}: one answer only, the smuggled request was not served`)
    assert.equal(up.received.length, 0, `${name}: forwarded to the upstream`)
  }
  // Two Host headers: well framed, but an upstream could pick either; refused, connection closed.
  const twoHosts = await rawRequest(gw.port, 'GET /svc/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n')
  assert.match(twoHosts, /^HTTP\/1\.1 400 /)
  assert.match(twoHosts, /GATEHOUSE_BAD_HOST/)
  assert.equal(up.received.length, 0)
  // The same connection handling works for a well-framed chunked body.
  const good = await rawRequest(gw.port, 'POST /svc/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n')
  assert.match(good, /^HTTP\/1\.1 200 /)
  assert.equal(up.received.length, 1)
})

test('a chunked body that turns malformed after forwarding began is cut off: the upstream never gets it complete', async (t) => {
  const outcome: string[] = []
  let arrived!: () => void
  const headArrived = new Promise<void>((resolve) => { arrived = resolve })
  let settled!: () => void
  const done = new Promise<void>((resolve) => { settled = resolve })
  const up = await startUpstream(t, (req, res) => {
    arrived()
    req.on('data', () => {})
    req.once('end', () => { outcome.push('complete'); settled(); res.end('ok') })
    req.once('close', () => { if (!req.complete) { outcome.push('aborted'); settled() } })
  })
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  const socket = net.connect(gw.port, '127.0.0.1')
  t.after(() => socket.destroy())
  await once(socket, 'connect')
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  const closed = once(socket, 'close')
  socket.write('POST /svc/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n')
  await headArrived
  socket.write('2\r\nabcdef\r\n0\r\n\r\n' + SMUGGLED)
  await done
  await closed
  assert.deepEqual(outcome, ['aborted'])
  assert.equal(up.received.length, 1, 'the smuggled request never reached the upstream')
  assert.doesNotMatch(Buffer.concat(chunks).toString('latin1'), /HTTP\/1\.1 200/)
})
