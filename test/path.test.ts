import { test } from 'node:test'
import assert from 'node:assert/strict'
import { BadPathError, normalizeUrl, upstreamPath } from '../src/path.js'

test('normalizeUrl leaves plain paths and every query untouched', () => {
  for (const url of ['/', '/a/b', '/a/b/', '/a?x=../y', '/a?q=%2F%2e%2e&x=1&x=2', '/a%20b/%C3%A9', '/a/..b/c..', '/a/.../b', '/*x', '/a;b=c,d']) {
    assert.equal(normalizeUrl(url), url)
  }
  assert.equal(normalizeUrl('*'), '*')
})

test('normalizeUrl resolves dot segments, encoded dots and empty segments', () => {
  const cases: Array<[string, string]> = [
    ['/a/../b', '/b'],
    ['/a/./b', '/a/b'],
    ['/a/%2e%2e/b', '/b'],
    ['/a/%2E%2e/b?x=%2e%2e', '/b?x=%2e%2e'],
    ['/a/.%2e/b', '/b'],
    ['/../../b', '/b'],
    ['//a//b', '/a/b'],
    ['/a/b/..', '/a/'],
    ['/a/b/.', '/a/b/'],
    ['/%61/%7Ex', '/a/~x'],
    ['/a/%41%2D', '/a/A-'],
    ['/a/%20/../b', '/a/b']
  ]
  for (const [url, expected] of cases) assert.equal(normalizeUrl(url), expected, url)
  // Reserved and non-ASCII escapes stay encoded, byte for byte.
  assert.equal(normalizeUrl('/x/../a%3Fb/%C3%A9/%25'), '/a%3Fb/%C3%A9/%25')
})

test('normalizeUrl refuses what upstreams would read differently', () => {
  for (const url of ['/a%2fb', '/a%2F..%2Fb', '/a%5cb', '/a\\b', '/a%00', '/a%zz', '/a%2', '/a%', '/a#b', '/a?x#y', 'a/b', 'http://evil/']) {
    assert.throws(() => normalizeUrl(url), BadPathError, url)
  }
})

test('upstreamPath strips the prefix by default and applies rewrite.prefix', () => {
  assert.equal(upstreamPath('/orders', '/orders', '/'), '/')
  assert.equal(upstreamPath('/orders/', '/orders', '/'), '/')
  assert.equal(upstreamPath('/orders/1?x=1', '/orders', '/'), '/1')
  assert.equal(upstreamPath('/orders/1', '/orders', '/orders'), '/orders/1')
  assert.equal(upstreamPath('/orders', '/orders', '/orders'), '/orders')
  assert.equal(upstreamPath('/api/v1/users', '/api/v1', '/internal/'), '/internal/users')
  assert.equal(upstreamPath('/x/y', '/', '/'), '/x/y')
  assert.equal(upstreamPath('/x/y', '/', '/base'), '/base/x/y')
})
