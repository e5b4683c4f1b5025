import { test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'undici'
import { rawRequest, startGateway, startUpstream } from './helper.js'
import { parseTraceParent } from '../plugins/tracing.js'

const TRACE = '0af7651916cd43dd8448eb211c80319c'
const PARENT = 'b7ad6b7169203331'
const VALID = `00-${TRACE}-${PARENT}-01`
const FORWARDED = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/

test('parseTraceParent accepts W3C level-1 traceparent values and refuses every malformed one', () => {
  assert.deepEqual(parseTraceParent(VALID), { traceId: TRACE, parentId: PARENT, flags: '01' })
  assert.deepEqual(parseTraceParent(` ${VALID} `), { traceId: TRACE, parentId: PARENT, flags: '01' })
  // A later version may append fields; its first four are read the same way.
  assert.deepEqual(parseTraceParent(`cc-${TRACE}-${PARENT}-01-what-the-future-holds`), { traceId: TRACE, parentId: PARENT, flags: '01' })
  for (const bad of [
    undefined,
    ['a', 'b'],
    '',
    `ff-${TRACE}-${PARENT}-01`, // version ff is invalid
    `00-${TRACE.toUpperCase()}-${PARENT}-01`, // upper-case hex
    `00-${'0'.repeat(32)}-${PARENT}-01`, // all-zero trace id
    `00-${TRACE}-${'0'.repeat(16)}-01`, // all-zero parent id
    `00-${TRACE}-${PARENT}-01-extra`, // version 00 has exactly four fields
    `00-${TRACE.slice(1)}-${PARENT}-01`,
    `00-${TRACE}-${PARENT}-1`,
    `00_${TRACE}_${PARENT}_01`,
    `00-${TRACE}-${PARENT}-0g`,
    `cc-${TRACE}-${PARENT}-01extra`,
    `${VALID}, ${VALID}` // two headers joined
  ]) assert.equal(parseTraceParent(bad as string), undefined, String(bad))
})

async function echo (t: Parameters<typeof startUpstream>[0]): Promise<{ url: string }> {
  const up = await startUpstream(t)
  return await startGateway(t, { routes: { tr: { match: { prefix: '/tr' }, upstream: { targets: [{ url: up.url }] } } } })
}

async function upstreamHeaders (url: string, headers: Record<string, string>): Promise<{ seen: Record<string, string>, response: Record<string, unknown> }> {
  const res = await request(url, { headers })
  assert.equal(res.statusCode, 200)
  const body = await res.body.json() as { headers: Record<string, string> }
  return { seen: body.headers, response: res.headers }
}

test('a request without traceparent starts a trace: the upstream gets a new, random, sampled traceparent', async (t) => {
  const gw = await echo(t)
  const a = await upstreamHeaders(`${gw.url}/tr/a`, { tracestate: 'orphan=1' })
  const b = await upstreamHeaders(`${gw.url}/tr/b`, {})
  const ma = FORWARDED.exec(a.seen.traceparent)
  const mb = FORWARDED.exec(b.seen.traceparent)
  assert.ok(ma !== null && mb !== null, `${a.seen.traceparent} / ${b.seen.traceparent}`)
  assert.ok(parseTraceParent(a.seen.traceparent), 'a valid traceparent')
  assert.equal(ma[3], '03', 'sampled, random trace id')
  assert.notEqual(ma[1], mb[1], 'each request its own trace')
  assert.notEqual(ma[2], mb[2])
  // A tracestate without a traceparent belongs to no trace: it is dropped.
  assert.equal(a.seen.tracestate, undefined)
  // X-Request-Id goes upstream too, the one the client gets back.
  assert.equal(a.seen['x-request-id'], a.response['x-request-id'])
})

test('a valid traceparent keeps its trace id and sampling; the upstream sees the gateway span as parent; tracestate passes unchanged', async (t) => {
  const gw = await echo(t)
  const { seen } = await upstreamHeaders(`${gw.url}/tr/x`, { traceparent: VALID, tracestate: 'congo=t61rcWkgMzE,rojo=00f067aa0ba902b7' })
  const m = FORWARDED.exec(seen.traceparent)
  assert.ok(m !== null, seen.traceparent)
  assert.equal(m[1], TRACE)
  assert.notEqual(m[2], PARENT, 'the gateway is a hop of its own')
  assert.notEqual(m[2], '0'.repeat(16))
  assert.equal(m[3], '01')
  assert.equal(seen.tracestate, 'congo=t61rcWkgMzE,rojo=00f067aa0ba902b7')

  const unsampled = await upstreamHeaders(`${gw.url}/tr/x`, { traceparent: `00-${TRACE}-${PARENT}-00` })
  assert.match(unsampled.seen.traceparent, new RegExp(`^00-${TRACE}-[0-9a-f]{16}-00$`), 'not sampled stays not sampled')
  const reserved = await upstreamHeaders(`${gw.url}/tr/x`, { traceparent: `00-${TRACE}-${PARENT}-ff` })
  assert.match(reserved.seen.traceparent, new RegExp(`^00-${TRACE}-[0-9a-f]{16}-03$`), 'reserved flag bits are zeroed')
  const future = await upstreamHeaders(`${gw.url}/tr/x`, { traceparent: `cc-${TRACE}-${PARENT}-01-more` })
  assert.match(future.seen.traceparent, new RegExp(`^00-${TRACE}-[0-9a-f]{16}-01$`), 'a later version is continued as 00')
})

test('an invalid traceparent restarts the trace and drops its tracestate', async (t) => {
  const gw = await echo(t)
  for (const bad of [`00-${TRACE.toUpperCase()}-${PARENT}-01`, `00-${'0'.repeat(32)}-${PARENT}-01`, `ff-${TRACE}-${PARENT}-01`, 'garbage']) {
    const { seen } = await upstreamHeaders(`${gw.url}/tr/x`, { traceparent: bad, tracestate: 'vendor=abc' })
    const m = FORWARDED.exec(seen.traceparent)
    assert.ok(m !== null, `${bad} -> ${seen.traceparent}`)
    assert.notEqual(m[1], TRACE.toLowerCase(), bad)
    assert.notEqual(m[1], '0'.repeat(32))
    assert.equal(seen.tracestate, undefined, bad)
  }
  // Two traceparent headers (joined by the server) name no single parent.
  const port = Number(new URL(gw.url).port)
  const raw = await rawRequest(port, `GET /tr/x HTTP/1.1\r\nHost: a\r\nTraceparent: ${VALID}\r\nTraceparent: 00-${'1'.repeat(32)}-${PARENT}-01\r\nConnection: close\r\n\r\n`)
  assert.match(raw, /^HTTP\/1\.1 200/)
  const seen = (JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)) as { headers: Record<string, string> }).headers
  const m = FORWARDED.exec(seen.traceparent)
  assert.ok(m !== null, seen.traceparent)
  assert.ok(m[1] !== TRACE && m[1] !== '1'.repeat(32))
})
