/* eslint-disable no-template-curly-in-string -- these tests are about ${ENV} references in config files */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { loadGatewayConfig, loadRoutes, ConfigError, type ConfigProblem } from '../src/config.js'

function tempDir (t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-config-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'routes'))
  return dir
}

function problemsOf (fn: () => unknown): ConfigProblem[] {
  try {
    fn()
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err))
    return err.problems
  }
  assert.fail('no ConfigError')
}

async function routeProblems (dir: string, env: NodeJS.ProcessEnv = {}): Promise<ConfigProblem[]> {
  try {
    await loadRoutes(join(dir, 'routes'), env)
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err))
    return err.problems
  }
  assert.fail('no ConfigError')
}

test('gatehouse.yaml: unknown key, wrong type, bad duration, bad size and missing env var each name file, field and hint', (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'gatehouse.yaml')
  writeFileSync(file, [
    'listen: { host: 127.0.0.1, port: ${GATEHOUSE_TEST_PORT}, prot: 1 }',
    'limits: { headersTimeout: 5 parsecs, bodyLimit: true, maxHeaderBytes: 16 KiBs }',
    'securityHeaders: sometimes',
    'trustProxy: true'
  ].join('\n'))
  const problems = problemsOf(() => loadGatewayConfig(file, {}, {}))
  const byPath = new Map(problems.map((p) => [p.path, p]))
  for (const p of problems) assert.equal(p.file, file)

  assert.match(byPath.get('/listen/port')?.message ?? '', /environment variable GATEHOUSE_TEST_PORT is not set/)
  assert.match(byPath.get('/listen/port')?.hint ?? '', /export GATEHOUSE_TEST_PORT, or write \$\{GATEHOUSE_TEST_PORT:-default\}/)
  assert.equal(problems.filter((p) => p.path === '/listen/port').length, 1, 'reported once')
  assert.match(byPath.get('/listen/prot')?.message ?? '', /unexpected property/)
  assert.match(byPath.get('/listen/prot')?.hint ?? '', /allowed keys here: host, port/)
  assert.match(byPath.get('/limits/headersTimeout')?.hint ?? '', /use a duration such as 250ms/)
  assert.match(byPath.get('/limits/bodyLimit')?.hint ?? '', /use a size such as 512KiB/, 'true is not converted to 1 byte')
  assert.match(byPath.get('/limits/maxHeaderBytes')?.hint ?? '', /use a size/)
  assert.match(byPath.get('/securityHeaders')?.message ?? '', /boolean/)
  assert.match(byPath.get('/trustProxy')?.hint ?? '', /list the CIDRs of your load balancers/)
  // The formatted message is `FILE: /field: problem (hint)`, one line per problem.
  const err = new ConfigError(problems)
  for (const line of err.message.split('\n')) assert.match(line, new RegExp(`^${file}: /\\S+: .+ \\(.+\\)$`))
})

test('${VAR} and ${VAR:-default} work unquoted inside YAML flow mappings, and interpolated strings get their types', (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'gatehouse.yaml')
  writeFileSync(file, [
    'listen: { host: ${HOST:-127.0.0.1}, port: ${PORT} }',
    'admin: { host: 127.0.0.1, port: ${ADMIN_PORT:-9999} }',
    'limits: { bodyLimit: ${BODY_LIMIT:-2MiB}, headersTimeout: ${HEADERS_TIMEOUT} }',
    'securityHeaders: ${SECURITY_HEADERS}',
    'trustProxy: [${LB_CIDR:-10.0.0.0/8}, 127.0.0.1]'
  ].join('\n'))
  const { config, routesDir } = loadGatewayConfig(file, {}, { PORT: '8181', HEADERS_TIMEOUT: '2s', SECURITY_HEADERS: 'false', LB_CIDR: '' })
  assert.equal(config.listen.host, '127.0.0.1')
  assert.equal(config.listen.port, 8181)
  assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9999 })
  assert.equal(config.limits.bodyLimit, 2 * 1024 * 1024)
  assert.equal(config.limits.headersTimeout, 2000)
  assert.equal(config.securityHeaders, false)
  assert.deepEqual(config.trustProxy, ['10.0.0.0/8', '127.0.0.1'], 'an empty variable takes the default')
  assert.equal(routesDir, join(dir, 'routes'), 'routes resolve against the config file')
  assert.ok(Object.isFrozen(config.limits), 'the config is frozen')
})

test('durations and sizes decode to milliseconds and bytes; defaults fill the rest', (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'gatehouse.yaml')
  writeFileSync(file, 'limits: { bodyLimit: 512KiB, keepAliveTimeout: 1m, shutdownTimeout: 250 }\n')
  const { config } = loadGatewayConfig(file, {}, {})
  assert.equal(config.limits.bodyLimit, 512 * 1024)
  assert.equal(config.limits.keepAliveTimeout, 60_000)
  assert.equal(config.limits.shutdownTimeout, 250)
  assert.equal(config.limits.headersTimeout, 15_000, 'the default headers timeout is 15 s')
  assert.equal(config.limits.maxHeaderBytes, 16 * 1024)
  assert.equal(config.trustProxy, false, 'nobody is trusted by default')
})

test('CLI flags override the file', (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'gatehouse.yaml')
  writeFileSync(file, 'listen: { host: 0.0.0.0, port: 8080 }\nroutes: ./routes\n')
  const { config, routesDir } = loadGatewayConfig(file, { port: 9090, host: '127.0.0.1', routes: join(dir, 'elsewhere') }, {})
  assert.deepEqual(config.listen, { host: '127.0.0.1', port: 9090 })
  assert.equal(routesDir, join(dir, 'elsewhere'))
})

test('route files: unknown key, wrong type, bad duration and missing env var name file, field and hint', async (t) => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'routes', 'orders.yaml'), [
    'match: { prefix: /orders, hots: [a.example.com] }',
    'upstream: { targets: [{ url: "http://${ORDERS_HOST}:3002", weight: heavy }], timeouts: { response: soon } }',
    'preserveHost: maybe'
  ].join('\n'))
  const problems = await routeProblems(dir)
  const file = join(dir, 'routes', 'orders.yaml')
  const by = (path: string): ConfigProblem | undefined => problems.find((p) => p.path === path)
  for (const p of problems) assert.equal(p.file, file)
  assert.match(by('/match/hots')?.hint ?? '', /allowed keys here: prefix, hosts, methods/)
  assert.match(by('/upstream/targets/0/url')?.message ?? '', /environment variable ORDERS_HOST is not set/)
  assert.match(by('/upstream/targets/0/weight')?.message ?? '', /integer/)
  assert.match(by('/upstream/timeouts/response')?.hint ?? '', /use a duration/)
  assert.match(by('/preserveHost')?.message ?? '', /boolean/)
})

test('route files: a route needs an upstream or a static root, not both; .json and .yml are read too', async (t) => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'routes', 'none.yml'), 'match: { prefix: /none }\n')
  writeFileSync(join(dir, 'routes', 'both.json'), JSON.stringify({ match: { prefix: '/both' }, upstream: { targets: [{ url: 'http://127.0.0.1:1' }] }, static: { root: '.' } }))
  writeFileSync(join(dir, 'routes', 'README.md'), 'not a route file')
  const problems = await routeProblems(dir)
  assert.ok(problems.some((p) => p.file.endsWith('none.yml') && p.path === '/upstream' && p.hint !== undefined))
  assert.ok(problems.some((p) => p.file.endsWith('both.json') && p.path === '/static'))
  assert.equal(problems.length, 2)
})

test('route files: the name defaults to the file name, prefixes are normalized and defaults applied', async (t) => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'routes', 'Billing.yaml'), 'match: { prefix: /billing/ }\nupstream: { targets: [{ url: "${BILLING_URL:-http://127.0.0.1:4000}" }] }\n')
  const [route] = await loadRoutes(join(dir, 'routes'), {})
  assert.equal(route.name, 'billing')
  assert.equal(route.upstream?.targets[0].url, 'http://127.0.0.1:4000')
  assert.equal(route.upstream?.timeouts.connect, 2000)
  assert.equal(route.upstream?.timeouts.response, 30_000)
  assert.equal(route.preserveHost, false)
  assert.ok(Object.isFrozen(route))
})
