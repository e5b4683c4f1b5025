import { test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { parse } from 'yaml'
import { loadGatewayConfig, loadRoutes } from '../src/config.js'

// docker compose cannot run here (no Docker engine): check that everything it names exists and fits.
const root = resolve(__dirname, '..', '..')

interface Service {
  image?: string
  build?: string | { context: string, dockerfile?: string }
  command?: string[]
  entrypoint?: string[]
  environment?: Record<string, string>
  ports?: string[]
  expose?: string[]
  volumes?: string[]
  depends_on?: string[]
}

const compose = parse(readFileSync(join(root, 'docker-compose.yml'), 'utf8')) as { services: Record<string, Service> }
const services = compose.services

test('docker-compose runs two gateway replicas, Redis, Prometheus and the example services', () => {
  const gateways = Object.keys(services).filter((name) => services[name].command?.includes('start'))
  assert.ok(gateways.length >= 2, 'two gateway replicas')
  for (const name of ['redis', 'prometheus', 'users', 'orders']) assert.ok(services[name], `service ${name}`)
})

test('every build context has a Dockerfile whose COPY sources exist', () => {
  for (const [name, svc] of Object.entries(services)) {
    if (svc.build === undefined) {
      assert.ok(svc.image, `${name} has an image or a build`)
      continue
    }
    const context = typeof svc.build === 'string' ? svc.build : svc.build.context
    const dockerfile = join(root, context, typeof svc.build === 'string' ? 'Dockerfile' : svc.build.dockerfile ?? 'Dockerfile')
    assert.ok(existsSync(dockerfile), `${name}: ${dockerfile}`)
    for (const line of readFileSync(dockerfile, 'utf8').split('\n')) {
      const m = /^COPY\s+(?!--from)(.+)\s+\S+$/.exec(line.trim())
      if (m === null) continue
      for (const src of m[1].trim().split(/\s+/)) assert.ok(existsSync(join(root, context, src)), `${dockerfile}: COPY ${src}`)
    }
  }
})

test('every mounted file, depends_on and host port is consistent', () => {
  const hostPorts = new Set<string>()
  for (const [name, svc] of Object.entries(services)) {
    for (const v of svc.volumes ?? []) {
      const host = v.split(':')[0]
      if (host.startsWith('.') || host.startsWith('/')) assert.ok(existsSync(join(root, host)), `${name}: volume ${host}`)
    }
    for (const dep of svc.depends_on ?? []) assert.ok(services[dep], `${name} depends on ${dep}`)
    for (const p of svc.ports ?? []) {
      const [host, container] = p.split(':')
      assert.ok(Number(host) > 0 && Number(container) > 0, `${name}: port ${p}`)
      assert.ok(!hostPorts.has(host), `${name}: host port ${host} used once`)
      hostPorts.add(host)
    }
  }
})

test('the gateways config and routes are valid and point at compose services', async () => {
  for (const [name, svc] of Object.entries(services)) {
    const cmd = svc.command ?? []
    const i = cmd.indexOf('--config')
    if (i === -1) continue
    const file = join(root, cmd[i + 1])
    assert.ok(existsSync(file), `${name}: ${file}`)
    const env = { ...svc.environment }
    // .ts route files read process.env themselves (this file runs in its own test process).
    Object.assign(process.env, env)
    const loaded = loadGatewayConfig(file, {}, env)
    assert.ok(loaded.config.redis, `${name}: replicas share state through Redis`)
    assert.ok(services[new URL(loaded.config.redis.url).hostname], `${name}: redis host is a compose service`)
    const routes = await loadRoutes(loaded.routesDir, env)
    for (const route of routes) {
      for (const t of route.upstream?.targets ?? []) {
        const host = new URL(t.url).hostname
        assert.ok(services[host], `${name}: route ${route.name} target ${t.url} is a compose service`)
        const port = new URL(t.url).port
        assert.ok(services[host].expose?.includes(port), `${host} exposes ${port}`)
      }
    }
  }
})

test('Prometheus scrapes every gateway replica on its admin port', () => {
  const promFile = join(root, 'deploy', 'prometheus', 'prometheus.yml')
  const prom = parse(readFileSync(promFile, 'utf8')) as { scrape_configs: Array<{ static_configs?: Array<{ targets: string[] }> }> }
  const targets = prom.scrape_configs.flatMap((c) => c.static_configs ?? []).flatMap((s) => s.targets)
  const gateways = Object.keys(services).filter((name) => services[name].command?.includes('start'))
  for (const g of gateways) assert.ok(targets.includes(`${g}:9901`), `scrapes ${g}:9901`)
})
