#!/usr/bin/env node
import { parseArgs } from 'node:util'
import { existsSync } from 'node:fs'
import { METHODS } from 'node:http'
import pino from 'pino'
import closeWithGrace from 'close-with-grace'
import Fastify from 'fastify'
import { ConfigError, loadGatewayConfig, loadRoutes, normalizePrefix, type CliOverrides, type GatewayConfig, type RouteDefinition } from './config.js'
import { GatewayServer } from './server.js'
import { clustered, parseWorkers, startCluster } from './cluster.js'
import { fastifyOptions } from './app.js'
import { routeUrls } from './upstream.js'
import { normalizeUrl, upstreamPath, BadPathError } from './path.js'
import { formatDuration } from './units.js'

const USAGE = `Usage:
  gatehouse start   [--config gatehouse.yaml] [--routes DIR] [--port N] [--host H] [--workers N]
  gatehouse check   [--config gatehouse.yaml] [--routes DIR]
  gatehouse explain [--config gatehouse.yaml] [--routes DIR] METHOD URL [-H 'Name: value']...
`

interface Args {
  command: string
  configFile?: string
  overrides: CliOverrides
  workers?: string
  positionals: string[]
  headers: string[]
}

function parse (argv: string[]): Args {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c' },
      routes: { type: 'string', short: 'r' },
      port: { type: 'string', short: 'p' },
      host: { type: 'string' },
      workers: { type: 'string', short: 'w' },
      header: { type: 'string', short: 'H', multiple: true },
      help: { type: 'boolean', short: 'h' }
    }
  })
  if (values.help === true || positionals.length === 0) {
    process.stdout.write(USAGE)
    process.exit(values.help === true ? 0 : 1)
  }
  let configFile = values.config
  if (configFile === undefined && existsSync('gatehouse.yaml')) configFile = 'gatehouse.yaml'
  const overrides: CliOverrides = {}
  if (values.routes !== undefined) overrides.routes = values.routes
  if (values.host !== undefined) overrides.host = values.host
  if (values.port !== undefined) {
    const port = Number(values.port)
    if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`--port: ${values.port} is not a port number (use 0-65535)`)
    overrides.port = port
  }
  return { command: positionals[0], configFile, overrides, workers: values.workers, positionals: positionals.slice(1), headers: values.header ?? [] }
}

function fail (message: string): never {
  process.stderr.write(message + '\n')
  process.exit(1)
}

function concerns (route: RouteDefinition): string[] {
  const on: string[] = []
  if (route.auth !== undefined && route.auth !== 'none') {
    if (route.auth.jwt !== undefined && route.auth.jwt !== false) on.push('jwt')
    if (route.auth.apiKey === true) on.push('api-key')
  }
  if (route.rateLimit !== undefined && route.rateLimit !== false) on.push(`rate-limit ${route.rateLimit.max}/${formatDuration(route.rateLimit.window)} by ${route.rateLimit.key ?? 'ip'}`)
  if (route.cache?.enabled === true) on.push('cache')
  if (route.compress) on.push('compress')
  if (route.websocket) on.push('websocket')
  if (route.ipFilter !== undefined) on.push('ip-filter')
  if (route.cors !== undefined && route.cors !== false) on.push('cors')
  if (route.plugin !== undefined) on.push('plugin')
  return on
}

function matchText (route: RouteDefinition): string {
  const parts = [normalizePrefix(route.match.prefix)]
  if (route.match.hosts !== undefined) parts.push(`hosts=${route.match.hosts.join(',')}`)
  if (route.match.methods !== undefined) parts.push(`methods=${route.match.methods.join(',')}`)
  return parts.join(' ')
}

function targetsText (route: RouteDefinition): string {
  if (route.static !== undefined) return `static ${route.static.root}`
  const up = route.upstream
  if (up === undefined) return ''
  const targets = up.targets.map((t) => t.weight !== 1 ? `${t.url} (weight ${t.weight})` : t.url).join(', ')
  return up.targets.length > 1 ? `${targets} [${up.balancer}]` : targets
}

function table (rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  return rows.map((r) => r.map((c, i) => i === r.length - 1 ? c : c.padEnd(widths[i])).join('  ')).join('\n') + '\n'
}

async function load (args: Args): Promise<{ config: ReturnType<typeof loadGatewayConfig>, routes: RouteDefinition[] }> {
  const config = loadGatewayConfig(args.configFile, args.overrides)
  const routes = await loadRoutes(config.routesDir)
  return { config, routes }
}

async function check (args: Args): Promise<void> {
  const { config, routes } = await load(args)
  process.stdout.write(`config: ${config.file ?? '(embedded defaults)'}\nroutes: ${config.routesDir}\n\n`)
  const rows = [['NAME', 'MATCH', 'TARGETS', 'CONCERNS']]
  for (const r of [...routes].sort((a, b) => a.match.prefix.localeCompare(b.match.prefix))) {
    rows.push([r.name, matchText(r), targetsText(r), concerns(r).join(', ') || '-'])
  }
  process.stdout.write(table(rows))
  process.stdout.write(`\n${routes.length} route${routes.length === 1 ? '' : 's'} OK\n`)
}

/**
 * Which route the gateway's router picks: the route table registered on a bare Fastify with the
 * gateway's own router options and host constraint, each route answering its index, and one
 * injected request. (Fastify's findRoute() looks up a registered pattern, not a URL.) Nothing is
 * forwarded and no concern runs, so explain has no side effects (no upstream, no Redis).
 */
async function matchRoute (config: GatewayConfig, routes: readonly RouteDefinition[], method: string, path: string, headers: Record<string, string>): Promise<RouteDefinition | undefined> {
  const app = Fastify(fastifyOptions(config, pino({ level: 'silent' })) as Parameters<typeof Fastify>[0])
  for (const m of METHODS) if (m !== 'CONNECT' && !app.supportedMethods.includes(m)) app.addHttpMethod(m, { hasBody: true })
  const all = app.supportedMethods.filter((m) => m !== 'CONNECT')
  routes.forEach((route, i) => {
    const prefix = normalizePrefix(route.match.prefix)
    for (const host of route.match.hosts?.map((h) => h.toLowerCase()) ?? [undefined]) {
      for (const url of routeUrls(prefix)) {
        app.route({
          method: route.match.methods !== undefined ? [...route.match.methods] : all,
          url,
          ...(host !== undefined ? { constraints: { hostname: host } } : {}),
          handler: async () => String(i)
        })
      }
    }
  })
  app.setNotFoundHandler(async (_request, reply) => await reply.code(404).send('none'))
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (_request, payload, done) => { done(null, payload) })
  const res = await app.inject({ method: method as 'GET', url: path, headers })
  await app.close()
  return res.statusCode === 200 ? routes[Number(res.body)] : undefined
}

async function explain (args: Args): Promise<void> {
  const [method, rawUrl] = args.positionals
  if (method === undefined || rawUrl === undefined) fail('explain needs METHOD and URL, e.g. gatehouse explain GET http://api.example.com/orders/1')
  const { config, routes } = await load(args)
  const url = new URL(rawUrl, 'http://localhost')
  const headers: Record<string, string> = { host: url.host }
  for (const h of args.headers) {
    const i = h.indexOf(':')
    if (i < 1) fail(`-H ${h}: expected 'Name: value'`)
    headers[h.slice(0, i).trim().toLowerCase()] = h.slice(i + 1).trim()
  }
  let path: string
  try {
    path = normalizeUrl(url.pathname + url.search)
  } catch (err) {
    if (err instanceof BadPathError) fail(`${method} ${rawUrl}: refused with 400 (${err.message})`)
    throw err
  }
  const host = headers.host.replace(/:\d+$/, '').toLowerCase()
  const route = await matchRoute(config.config, routes, method.toUpperCase(), path, headers)
  if (route === undefined) {
    process.stdout.write(`${method.toUpperCase()} ${path} (host ${host}): no route, the gateway answers 404 GATEHOUSE_ROUTE_NOT_FOUND\n`)
    process.exitCode = 2
    return
  }
  const lines = [
    `route:     ${route.name} (${route.file})`,
    `match:     ${matchText(route)}`
  ]
  if (route.upstream !== undefined) {
    const upPath = upstreamPath(path, normalizePrefix(route.match.prefix), route.rewrite?.prefix ?? '/')
    const q = path.indexOf('?')
    lines.push(`upstream:  ${method.toUpperCase()} ${upPath}${q === -1 ? '' : path.slice(q)}${route.preserveHost ? ` (Host: ${headers.host})` : ''}`)
    lines.push(`targets:   ${targetsText(route)}`)
    lines.push(`timeouts:  connect ${formatDuration(route.upstream.timeouts.connect)}, response ${formatDuration(route.upstream.timeouts.response)}; retries ${route.upstream.retries.attempts}`)
  } else {
    lines.push(`serves:    ${targetsText(route)}`)
  }
  lines.push(`concerns:  ${concerns(route).join(', ') || '-'}`)
  process.stdout.write(lines.join('\n') + '\n')
}

async function start (args: Args): Promise<void> {
  let workers = 1
  try {
    workers = parseWorkers(args.workers)
  } catch (err) {
    fail((err as Error).message)
  }
  if (clustered(workers)) {
    await startCluster({ workers, configFile: args.configFile, overrides: args.overrides })
    return
  }
  const gateway = new GatewayServer({ configFile: args.configFile, overrides: args.overrides })
  await gateway.start()
  process.on('SIGHUP', () => { void gateway.reload() })
  // close-with-grace treats SIGHUP as a shutdown signal by default: it means reload here.
  closeWithGrace({ delay: gateway.config.limits.shutdownTimeout + 5000, skip: ['SIGHUP'] }, async ({ signal, err }) => {
    if (err !== undefined) gateway.logger.error({ err }, 'fatal error, shutting down')
    else gateway.logger.info({ signal }, 'shutting down: draining in-flight requests')
    await gateway.close()
  })
}

async function main (): Promise<void> {
  const args = parse(process.argv.slice(2))
  try {
    if (args.command === 'start') await start(args)
    else if (args.command === 'check') await check(args)
    else if (args.command === 'explain') await explain(args)
    else fail(`unknown command ${args.command}\n${USAGE}`)
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message)
    throw err
  }
}

void main()
