import { test } from 'node:test'
import assert from 'node:assert/strict'
import { rawRequest, startGateway, startUpstream } from './helper.js'
import { hsToken, now } from './auth-tokens.js'

const SECRET = 'a-test-secret-that-is-at-least-32-characters'

/*
 * Path confusion against a protected prefix: whatever spelling a client uses, a request either
 * matches the protected route (and needs its token) or is refused; it never reaches the secure
 * upstream without a token. Sent raw, so no client library normalizes the path first.
 */
const confusions = [
  '/public/../secure',
  '/public/%2e%2e/secure',
  '/public/%2E%2E/secure',
  '/public/.%2e/secure',
  '/public/./../secure/x',
  '//secure',
  '///secure/x',
  '/secure%2f..',
  '/secure%2F../x',
  '/public%2f..%2fsecure',
  '/public/..%2fsecure',
  '/public\\..\\secure',
  '/%73ecure',
  '/secure;jsessionid=1',
  '/secure/..;/x',
  '/SECURE',
  '/Secure/x',
  '/secure%00',
  '/secure%'
]

test('the path-confusion set never reaches the protected upstream without a token', async (t) => {
  const secure = await startUpstream(t)
  const pub = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET } },
    routes: {
      secure: { match: { prefix: '/secure' }, upstream: { targets: [{ url: secure.url }] }, auth: { jwt: true } },
      public: { match: { prefix: '/public' }, upstream: { targets: [{ url: pub.url }] } }
    }
  })
  for (const path of confusions) {
    const answer = await rawRequest(gw.port, `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
    const status = Number(answer.slice(9, 12))
    assert.ok([400, 401, 404].includes(status), `${path} answered ${status}`)
    assert.equal(secure.received.length, 0, `${path} reached the secure upstream`)
    assert.equal(pub.received.length, 0, `${path} was forwarded to the public upstream`)
  }
  // Double encoding is not decoded twice: it is a path under /public, forwarded exactly as routed.
  const double = await rawRequest(gw.port, 'GET /public/%252e%252e/secure HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  assert.match(double, /^HTTP\/1\.1 200 /)
  assert.equal(pub.received.at(-1)?.url, '/%252e%252e/secure')
  assert.equal(secure.received.length, 0)
  // Sanity: the same spellings with a valid token are either refused or reach /secure normalized.
  const token = hsToken(SECRET, { sub: 'u', exp: now() + 600 })
  const answer = await rawRequest(gw.port, `GET /public/%2e%2e/secure/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\nConnection: close\r\n\r\n`)
  assert.match(answer, /^HTTP\/1\.1 200 /)
  assert.equal(secure.received.at(-1)?.url, '/x', 'the upstream receives the normalized path that was authorized')
})
