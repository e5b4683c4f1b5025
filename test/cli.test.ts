import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { spawn } from 'node:child_process'
import { stringify } from 'yaml'

const ROOT = join(__dirname, '..', '..')
const CLI = join(ROOT, 'dist', 'src', 'cli.js')

async function cli (args: string[], cwd = ROOT, env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null, stdout: string, stderr: string }> {
  const proc = spawn(process.execPath, [CLI, ...args], { cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  proc.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
  proc.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
  const code = await new Promise<number | null>((resolve) => proc.once('close', (c) => resolve(c)))
  return { code, stdout, stderr }
}

function tempConfig (t: { after: (fn: () => void) => void }, routes: Record<string, string>, config: Record<string, unknown> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-cli-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'routes'))
  for (const [file, text] of Object.entries(routes)) writeFileSync(join(dir, 'routes', file), text)
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify({ routes: './routes', ...config }))
  return dir
}

test('gatehouse check on the repository\'s examples prints the route table and exits 0', async () => {
  const { code, stdout, stderr } = await cli(['check', '--config', 'gatehouse.yaml'])
  assert.equal(stderr, '')
  assert.equal(code, 0)
  assert.match(stdout, /NAME\s+MATCH\s+TARGETS\s+CONCERNS/)
  assert.match(stdout, /\n\s*users\s+\/users\s+http:\/\/127\.0\.0\.1:3001/)
  assert.match(stdout, /\n\s*orders\s+\/orders methods=GET,POST\s+http:\/\/127\.0\.0\.1:3002\s+.*plugin/)
  assert.match(stdout, /\n\s*docs\s+\/docs\s+static \S+public/)
  assert.match(stdout, /3 routes OK/)
})

test('gatehouse check on a broken route file prints FILE: /field: problem (hint) per error and exits 1', async (t) => {
  const dir = tempConfig(t, {
    'good.yaml': 'match: { prefix: /good }\nupstream: { targets: [{ url: http://127.0.0.1:1 }] }\n',
    'bad.yaml': [
      'match: { prefix: orders, methodz: [GET] }',
      'upstream: { targets: [{ url: "ftp://x" }], timeouts: { connect: 5 parsecs }, balancer: fastest }',
      'bodyLimit: true'
    ].join('\n')
  })
  const { code, stdout, stderr } = await cli(['check', '--config', join(dir, 'gatehouse.yaml')])
  assert.equal(code, 1)
  assert.equal(stdout, '', 'no route table when anything is wrong')
  const file = join(dir, 'routes', 'bad.yaml')
  const lines = stderr.trim().split('\n')
  const expected: Array<[string, RegExp]> = [
    ['/match/methodz', /unexpected property \(allowed keys here: prefix, hosts, methods\)$/],
    ['/match/prefix', /\(start with \/, e\.g\. \/orders/],
    ['/upstream/targets/0/url', /\(use http:\/\/host:port or https:\/\/host:port\)$/],
    ['/upstream/timeouts/connect', /\(use a duration such as 250ms, 5s, 1m or a number of milliseconds\)$/],
    ['/upstream/balancer', /\(use one of: round-robin, weighted, least-connections, p2c, random, consistent-hash\)$/],
    ['/bodyLimit', /\(use a size such as 512KiB, 10MiB or a number of bytes\)$/]
  ]
  for (const [field, hint] of expected) {
    const line = lines.find((l) => l.startsWith(`${file}: ${field}: `))
    assert.ok(line !== undefined, `no line for ${field} in:\n${stderr}`)
    assert.match(line, hint)
  }
  assert.equal(lines.length, expected.length, stderr)
})

test('gatehouse check reports a duplicate prefix across files and a missing env var', async (t) => {
  const dir = tempConfig(t, {
    // eslint-disable-next-line no-template-curly-in-string -- a config file's ${ENV} reference
    'a.yaml': 'match: { prefix: /orders }\nupstream: { targets: [{ url: "http://127.0.0.1:${ORDERS_PORT}" }] }\n',
    'b.yaml': 'match: { prefix: /orders/ }\nupstream: { targets: [{ url: http://127.0.0.1:2 }] }\n'
  })
  const env = { ORDERS_PORT: '' }
  const { code, stderr } = await cli(['check', '--config', join(dir, 'gatehouse.yaml')], ROOT, env)
  assert.equal(code, 1)
  assert.match(stderr, new RegExp(`${join(dir, 'routes', 'a.yaml')}: /upstream/targets/0/url: environment variable ORDERS_PORT is not set \\(export ORDERS_PORT, or write \\$\\{ORDERS_PORT:-default\\}\\)`))
  assert.match(stderr, new RegExp(`${join(dir, 'routes', 'b.yaml')}: /match/prefix: /orders/ is already routed by .*a\\.yaml \\(`))
})

test('gatehouse explain names the route, the upstream path and the targets', async () => {
  // Each run starts a process: run them side by side.
  const [orders, docs] = await Promise.all([
    cli(['explain', '--config', 'gatehouse.yaml', 'GET', 'http://localhost/orders/1?expand=items']),
    cli(['explain', '--config', 'gatehouse.yaml', 'GET', 'http://localhost/docs/index.html'])
  ])
  assert.equal(orders.code, 0, orders.stderr)
  assert.match(orders.stdout, /^route:\s+orders \(.*routes\/orders\.ts\)$/m)
  assert.match(orders.stdout, /^upstream:\s+GET \/orders\/1\?expand=items$/m)
  assert.match(orders.stdout, /^targets:\s+http:\/\/127\.0\.0\.1:3002$/m)
  assert.match(orders.stdout, /^concerns:\s+.*plugin/m)

  assert.match(docs.stdout, /^route:\s+docs /m)
  assert.match(docs.stdout, /^serves:\s+static /m)
})

test('gatehouse explain follows the router: segment boundary, methods, hosts; no route exits 2', async (t) => {
  const dir = tempConfig(t, {
    'api.yaml': 'match: { prefix: /api, hosts: [api.example.com] }\nupstream: { targets: [{ url: http://10.0.0.1:80 }] }\n',
    'ro.yaml': 'match: { prefix: /ro, methods: [GET] }\nupstream: { targets: [{ url: http://10.0.0.2:80 }] }\n'
  })
  const config = join(dir, 'gatehouse.yaml')
  const [host, otherHost, post, bad] = await Promise.all([
    ['GET', 'http://API.example.com:8443/api/x/y'],
    ['GET', 'http://other.example.com/api/x'],
    ['POST', 'http://x/ro/1'],
    ['GET', 'http://x/ro/a%2fb']
  ].map(async ([method, url]) => await cli(['explain', '--config', config, method, url])))
  assert.match(host.stdout, /^route:\s+api /m)
  assert.match(host.stdout, /^targets:\s+http:\/\/10\.0\.0\.1:80$/m)
  assert.match(host.stdout, /^upstream:\s+GET \/x\/y$/m, 'the prefix is stripped')
  assert.equal(otherHost.code, 2)
  assert.match(otherHost.stdout, /no route, the gateway answers 404 GATEHOUSE_ROUTE_NOT_FOUND/)
  assert.equal(post.code, 2, 'a GET-only route does not serve POST')
  assert.equal(bad.code, 1)
  assert.match(bad.stderr, /refused with 400/)
})

test('gatehouse with a bad flag exits 1 and says why', async () => {
  const port = await cli(['check', '--config', 'gatehouse.yaml', '--port', '70000'])
  assert.equal(port.code, 1)
  assert.match(port.stderr, /--port: 70000 is not a port number/)
})

test('gatehouse start with a broken route file starts nothing and exits 1 naming file and field', async (t) => {
  const dir = tempConfig(t, { 'bad.yaml': 'match: { prefix: /bad }\nupstream: { targets: [] }\n' }, { listen: { host: '127.0.0.1', port: 0 }, admin: false })
  const { code, stdout, stderr } = await cli(['start', '--config', join(dir, 'gatehouse.yaml')])
  assert.equal(code, 1)
  assert.doesNotMatch(stdout, /gatehouse listening/)
  assert.match(stderr, new RegExp(`^${join(dir, 'routes', 'bad.yaml')}: /upstream/targets: .+ \\(list at least one target`, 'm'))
})
