import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { startGateway } from './helper.js'
import { call, rawCall } from './core-helper.js'

/** A site root with files, and secrets next to it (outside the root) that must never be served. */
function site (t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-static-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'public', 'guide'), { recursive: true })
  writeFileSync(join(dir, 'public', 'index.html'), '<h1>docs</h1>')
  writeFileSync(join(dir, 'public', 'a.txt'), 'file a')
  writeFileSync(join(dir, 'public', 'guide', 'index.html'), '<h1>guide</h1>')
  writeFileSync(join(dir, 'public', '.env'), 'SECRET=in-root-dotfile')
  writeFileSync(join(dir, 'package.json'), '{"secret":"outside-root"}')
  writeFileSync(join(dir, 'secret.txt'), 'outside-root')
  return join(dir, 'public')
}

test('a static route serves files with ETag and Cache-Control; If-None-Match gets 304', async (t) => {
  const root = site(t)
  const gw = await startGateway(t, { routes: { docs: { match: { prefix: '/docs' }, static: { root, maxAge: '1h' } } } })
  const res = await call(`${gw.url}/docs/a.txt`)
  assert.equal(res.status, 200)
  assert.equal(res.text, 'file a')
  const etag = res.headers.etag as string
  assert.match(etag, /^(W\/)?"/)
  assert.equal(res.headers['cache-control'], 'public, max-age=3600')
  assert.ok(res.headers['last-modified'])

  const again = await call(`${gw.url}/docs/a.txt`, { headers: { 'if-none-match': etag } })
  assert.equal(again.status, 304)
  assert.equal(again.text, '')

  const other = await call(`${gw.url}/docs/index.html`, { headers: { 'if-none-match': etag } })
  assert.equal(other.status, 200, 'an ETag answers conditionals only for its own file')

  assert.equal((await call(`${gw.url}/docs/`)).text, '<h1>docs</h1>')
  assert.equal((await call(`${gw.url}/docs/guide/`)).text, '<h1>guide</h1>')
  const head = await call(`${gw.url}/docs/a.txt`, { method: 'HEAD' })
  assert.equal(head.status, 200)
  assert.equal(head.headers['content-length'], '6')

  const missing = await call(`${gw.url}/docs/nope.txt`)
  assert.equal(missing.status, 404)
  assert.match(String(missing.headers['content-type']), /^application\/problem\+json/)
})

test('static paths never escape the root: dot segments, encoded dots, encoded slashes, dotfiles', async (t) => {
  const root = site(t)
  const gw = await startGateway(t, { routes: { docs: { match: { prefix: '/docs' }, static: { root } } } })
  const attempts = [
    '/docs/../package.json',
    '/docs/%2e%2e/package.json',
    '/docs/%2E%2E/secret.txt',
    '/docs/.%2e/.%2e/secret.txt',
    '/docs/guide/../../secret.txt',
    '/docs/..%2fsecret.txt',
    '/docs/..%5csecret.txt',
    '/docs/..\\secret.txt',
    '/docs/%252e%252e/secret.txt',
    '/docs/.env',
    '/docs/%2eenv'
  ]
  for (const path of attempts) {
    const res = await rawCall(gw.port, [`GET ${path} HTTP/1.1`, 'Host: gw.test'])
    assert.ok([400, 403, 404].includes(res.status), `${path}: ${res.status}`)
    assert.ok(!res.body.includes('outside-root') && !res.body.includes('in-root-dotfile'), `${path} leaked a file`)
  }
})

test('a static route with several hosts serves every one of them', async (t) => {
  const root = site(t)
  const gw = await startGateway(t, { routes: { docs: { match: { prefix: '/docs', hosts: ['docs.example.com', '*.docs.test'] }, static: { root } } } })
  for (const host of ['docs.example.com', 'DOCS.example.com:8443', 'eu.docs.test']) {
    const res = await call(`${gw.url}/docs/a.txt`, { headers: { host } })
    assert.equal(res.status, 200, host)
    assert.equal(res.text, 'file a')
  }
  assert.equal((await call(`${gw.url}/docs/a.txt`, { headers: { host: 'other.example.com' } })).status, 404)
})

test('a static route file\'s plugin hooks reach its files', async (t) => {
  const root = site(t)
  const gw = await startGateway(t, { routes: {} })
  writeFileSync(join(gw.routesDir, 'docs.js'), `module.exports = {
    match: { prefix: '/docs' },
    static: { root: ${JSON.stringify(root)} },
    plugin: async (fastify) => {
      fastify.addHook('onSend', async (_request, reply) => { reply.header('x-docs-plugin', 'on') })
    }
  }\n`)
  assert.equal((await gw.gateway.reload()).ok, true)
  const res = await call(`${gw.url}/docs/a.txt`)
  assert.equal(res.status, 200)
  assert.equal(res.headers['x-docs-plugin'], 'on')
})
