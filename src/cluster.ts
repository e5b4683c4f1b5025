import cluster, { type Worker } from 'node:cluster'
import os from 'node:os'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import pino, { type Logger } from 'pino'
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client'
import { loadGatewayConfig, loadRoutes, type CliOverrides, type GatewayConfig } from './config.js'
import { GatewayServer, type ReloadResult } from './server.js'
import { registry, setScrapeSource, type Scrape } from './metrics.js'
import { metricsRoute } from '../plugins/metrics.js'
import admin from '../plugins/admin.js'

/*
 * `gatehouse start --workers N`: a node:cluster primary forks N workers that each run a
 * GatewayServer on the shared listening port (Node's round-robin scheduling). The primary serves
 * no traffic itself: it restarts dead workers with back-off, fans SIGHUP and SIGTERM out to them,
 * and runs the one admin listener, whose /metrics aggregates every worker's registry (a scrape of
 * a random worker would report a random fraction of the traffic). Other admin requests are passed
 * to the workers' admin API over IPC: reads to one worker, writes (POST /cache/purge) to all.
 */

type MetricJSON = { name: string, help: string, type: string, aggregator?: string, values: Array<{ value: number, labels: Record<string, string | number>, metricName?: string }> }

/** Messages between the primary and its workers. */
interface AdminRequest { method: string, url: string, headers: Record<string, string>, body?: string }
interface AdminResponse { statusCode: number, headers: Record<string, string>, body: string }
type ToWorker =
  | { type: 'gatehouse:reload', id: number }
  | { type: 'gatehouse:metrics', id: number }
  | { type: 'gatehouse:admin', id: number, request: AdminRequest }
  | { type: 'gatehouse:scraped', id: number, scrape: Scrape }
  | { type: 'gatehouse:shutdown' }
type FromWorker =
  | { type: 'gatehouse:ready', version: number, routes: number, port: number }
  | { type: 'gatehouse:reloaded', id: number, result: ReloadResult }
  | { type: 'gatehouse:metrics', id: number, metrics: MetricJSON[] }
  | { type: 'gatehouse:admin', id: number, response: AdminResponse }
  | { type: 'gatehouse:scrape', id: number }

/** Admin response headers passed on from a worker (framing headers are the primary's own). */
const ADMIN_HEADERS = ['content-type', 'cache-control', 'retry-after']

/** `auto` is one worker per available core; otherwise a positive integer. Undefined: one process. */
export function parseWorkers (value: string | undefined): number {
  if (value === undefined) return 1
  if (value === 'auto') return os.availableParallelism()
  const n = Number(value)
  if (!Number.isInteger(n) || n < 1 || n > 1024) throw new Error(`--workers: ${value} is not a number of workers (use a positive integer or auto)`)
  return n
}

/** Whether `start` should run as a cluster: more than one worker, or already forked as one. */
export function clustered (workers: number): boolean {
  return workers > 1 || cluster.isWorker
}

export interface ClusterOptions {
  workers: number
  configFile?: string
  overrides: CliOverrides
}

/** Entry point of `start --workers N` in both roles. */
export async function startCluster (options: ClusterOptions): Promise<void> {
  if (cluster.isWorker) await runWorker(options)
  else await new Primary(options).start()
}

/**
 * Gauges whose sum across workers means nothing: a target is healthy only if every worker sees
 * it healthy; a circuit is open if any worker has it open; the config version and its load time
 * are the same everywhere once a reload has reached every worker (min shows one that has not).
 */
const GAUGE_AGGREGATORS: Record<string, string> = {
  gatehouse_upstream_healthy: 'min',
  gatehouse_circuit_open: 'max',
  gatehouse_config_version: 'min',
  gatehouse_config_last_reload_success_timestamp_seconds: 'min',
  nodejs_version_info: 'first'
}

/** Per-process series that say nothing once summed over processes (start time is kept as min). */
const PER_PROCESS = new Set(['process_start_time_seconds'])

interface WorkerInfo {
  worker: Worker
  started: number
  ready: boolean
  version?: number
  routes?: number
  port?: number
  /** The worker's registry as of its last answered scrape. */
  metrics?: MetricJSON[]
}

class Primary {
  readonly options: ClusterOptions
  config!: GatewayConfig
  logger!: Logger
  admin: FastifyInstance | undefined
  private readonly workers = new Map<number, WorkerInfo>()
  /** Counters and histograms of workers that died, so the aggregate stays monotonic. */
  private retired: MetricJSON[] = []
  private readonly own = new Registry()
  private readonly restartsTotal = new Counter({ name: 'gatehouse_worker_restarts_total', help: 'Workers restarted after an unexpected exit', registers: [this.own] })
  private readonly workersGauge = new Gauge({ name: 'gatehouse_workers', help: 'Worker processes serving traffic', registers: [this.own] })
  private readonly scrapeGauge = new Gauge({ name: 'gatehouse_metrics_aggregation_seconds', help: 'How long the previous aggregated scrape of all workers took', registers: [this.own] })
  /** Consecutive quick deaths, for the restart back-off. */
  private crashes = 0
  private closing = false
  /** The route-table generation: 1 at start, +1 per reload that every worker took. */
  private generation = 1
  private requests = 0
  private readonly pending = new Map<string, { resolve: (m: FromWorker) => void }>()

  constructor (options: ClusterOptions) {
    this.options = options
  }

  async start (): Promise<void> {
    // Validate everything once in the primary: a bad config stops the start before any fork.
    const loaded = loadGatewayConfig(this.options.configFile, this.options.overrides)
    await loadRoutes(loaded.routesDir)
    this.config = loaded.config
    this.logger = pino({ level: this.config.logging.level }).child({ role: 'primary' })
    cluster.on('message', (worker, message: FromWorker) => { this.onMessage(worker, message) })
    cluster.on('exit', (worker, code, signal) => { this.onExit(worker, code, signal) })
    const ready = Array.from({ length: this.options.workers }, async () => await this.fork())
    await Promise.all(ready)
    if (this.config.admin !== false) await this.startAdmin(this.config.admin)
    process.on('SIGHUP', () => { void this.reload() })
    process.on('SIGTERM', () => { void this.shutdown('SIGTERM') })
    process.on('SIGINT', () => { void this.shutdown('SIGINT') })
    this.logger.info({ workers: this.options.workers, pid: process.pid }, 'gatehouse cluster started')
  }

  /** Forks one worker; resolves when it listens (or dies trying). */
  private async fork (): Promise<void> {
    const worker = cluster.fork()
    const info: WorkerInfo = { worker, started: Date.now(), ready: false }
    this.workers.set(worker.id, info)
    this.workersGauge.set(this.workers.size)
    await new Promise<void>((resolve) => {
      const done = (): void => { worker.off('message', onMessage); worker.off('exit', done); resolve() }
      const onMessage = (m: FromWorker): void => { if (m.type === 'gatehouse:ready') done() }
      worker.on('message', onMessage)
      worker.on('exit', done)
    })
  }

  private onMessage (worker: Worker, message: FromWorker): void {
    const info = this.workers.get(worker.id)
    if (message.type === 'gatehouse:ready' && info !== undefined) {
      info.ready = true
      info.version = message.version
      info.routes = message.routes
      info.port = message.port
      this.logger.info({ worker: worker.id, pid: worker.process.pid, port: message.port }, 'worker ready')
    } else if (message.type === 'gatehouse:scrape') {
      // metrics.onMainListener: a worker's /metrics serves the cluster's aggregate too.
      void this.scrape().then((scrape) => { if (worker.isConnected()) worker.send({ type: 'gatehouse:scraped', id: message.id, scrape } satisfies ToWorker) })
    } else if (message.type === 'gatehouse:reloaded' || message.type === 'gatehouse:metrics' || message.type === 'gatehouse:admin') {
      const key = `${message.id}:${worker.id}`
      this.pending.get(key)?.resolve(message)
      this.pending.delete(key)
    }
  }

  private onExit (worker: Worker, code: number | null, signal: string | null): void {
    const info = this.workers.get(worker.id)
    this.workers.delete(worker.id)
    this.workersGauge.set(this.workers.size)
    if (info?.metrics !== undefined) this.retire(info.metrics)
    if (this.closing) return
    // Quick deaths in a row back off exponentially (100 ms .. 30 s); a worker that lived 10 s resets it.
    const lived = Date.now() - (info?.started ?? 0)
    this.crashes = lived > 10_000 ? 0 : this.crashes + 1
    const delay = Math.min(30_000, 100 * 2 ** Math.max(0, this.crashes - 1))
    this.restartsTotal.inc()
    this.logger.error({ worker: worker.id, pid: worker.process.pid, code, signal, restartInMs: delay }, 'worker died, restarting it')
    setTimeout(() => { if (!this.closing) void this.fork() }, delay).unref()
  }

  /** Folds a dead worker's counters and histograms into the retired totals. */
  private retire (metrics: MetricJSON[]): void {
    const monotonic = metrics.filter((m) => m.type === 'counter' || m.type === 'histogram')
    this.retired = aggregateJSON([this.retired, monotonic])
  }

  /** Sends a request to every ready worker (or the first `limit`); resolves with the answers that came within `timeout`. */
  private async ask<T extends FromWorker> (make: (id: number) => ToWorker, timeout: number, limit = Infinity): Promise<Map<number, T>> {
    const id = ++this.requests
    const answers = new Map<number, T>()
    const waits: Array<Promise<void>> = []
    for (const info of this.workers.values()) {
      if (!info.ready || !info.worker.isConnected()) continue
      if (waits.length >= limit) break
      const key = `${id}:${info.worker.id}`
      waits.push(new Promise<void>((resolve) => {
        const timer = setTimeout(() => { this.pending.delete(key); resolve() }, timeout)
        this.pending.set(key, { resolve: (m) => { clearTimeout(timer); answers.set(info.worker.id, m as T); resolve() } })
      }))
      info.worker.send(make(id))
    }
    await Promise.all(waits)
    return answers
  }

  /** One scrape for the whole cluster: every worker's registry (or its last one), plus the retired. */
  async scrape (): Promise<Scrape> {
    const started = performance.now()
    const answers = await this.ask<Extract<FromWorker, { type: 'gatehouse:metrics' }>>((id) => ({ type: 'gatehouse:metrics', id }), 2000)
    const sets: MetricJSON[][] = [this.retired, await this.own.getMetricsAsJSON() as unknown as MetricJSON[]]
    for (const info of this.workers.values()) {
      const answer = answers.get(info.worker.id)
      if (answer !== undefined) info.metrics = answer.metrics
      // A worker too busy to answer is counted with its previous snapshot rather than dropped.
      if (info.metrics !== undefined) sets.push(info.metrics)
    }
    const body = await AggregatorRegistry.aggregate(sets.map(withAggregators)).metrics()
    this.scrapeGauge.set((performance.now() - started) / 1000)
    return { contentType: registry.contentType, body }
  }

  /** SIGHUP or POST /reload: every worker re-reads its route files. */
  async reload (): Promise<{ ok: boolean, workers: Array<ReloadResult & { worker: number }> }> {
    const answers = await this.ask<Extract<FromWorker, { type: 'gatehouse:reloaded' }>>((id) => ({ type: 'gatehouse:reload', id }), 30_000)
    const workers = [...answers.entries()].map(([worker, m]) => ({ worker, ...m.result }))
    for (const w of workers) {
      const info = this.workers.get(w.worker)
      if (info !== undefined) { info.version = w.version; info.routes = w.routes }
    }
    const ok = workers.length > 0 && workers.every((w) => w.ok)
    if (ok) this.generation++
    this.logger.info({ ok, workers: workers.length }, 'routes reloaded in every worker')
    return { ok, workers }
  }

  private async startAdmin (settings: { host: string, port: number }): Promise<void> {
    setScrapeSource(async () => await this.scrape())
    const app = Fastify({ loggerInstance: this.logger as FastifyBaseLogger, logController: new LogController({ disableRequestLogging: true }) }) as unknown as FastifyInstance
    this.admin = app
    app.get('/healthz', async () => ({ status: 'ok', workers: this.workers.size }))
    app.get('/readyz', async (_request, reply) => {
      const ready = [...this.workers.values()].filter((w) => w.ready)
      if (this.closing) return await reply.code(503).send({ status: 'draining' })
      if (ready.length === 0) return await reply.code(503).send({ status: 'starting', workers: 0 })
      // Worker versions restart at 1 with each new worker: the cluster reports its own generation.
      return { status: 'ready', workers: ready.length, version: this.generation, routes: ready[0].routes }
    })
    app.get('/workers', async () => ({
      workers: [...this.workers.values()].map((w) => ({ id: w.worker.id, pid: w.worker.process.pid, ready: w.ready, version: w.version, port: w.port, startedAt: new Date(w.started).toISOString() })),
      restarts: (await this.restartsTotal.get()).values[0]?.value ?? 0
    }))
    app.route(metricsRoute)
    app.post('/reload', async (_request, reply) => {
      const result = await this.reload()
      return await reply.code(result.ok ? 200 : 422).send(result)
    })
    // Everything else is the workers' admin API: a read from one worker, a write to every one
    // (each has its own memory cache and health view); the first failure, if any, is the answer.
    app.removeAllContentTypeParsers()
    app.addContentTypeParser('*', { parseAs: 'string' }, (_request, body, done) => { done(null, body) })
    app.all('/*', async (request, reply) => {
      const forwarded: AdminRequest = {
        method: request.method,
        url: request.url,
        headers: Object.fromEntries(Object.entries(request.headers).filter(([k, v]) => typeof v === 'string' && k !== 'content-length' && k !== 'connection') as Array<[string, string]>),
        ...(typeof request.body === 'string' && request.body !== '' ? { body: request.body } : {})
      }
      const answers = await this.ask<Extract<FromWorker, { type: 'gatehouse:admin' }>>((id) => ({ type: 'gatehouse:admin', id, request: forwarded }), 30_000, request.method === 'GET' || request.method === 'HEAD' ? 1 : Infinity)
      const responses = [...answers.values()].map((a) => a.response)
      if (responses.length === 0) return await reply.code(503).send({ status: 'no worker answered' })
      const res = responses.find((r) => r.statusCode >= 400) ?? responses[0]
      for (const h of ADMIN_HEADERS) if (res.headers[h] !== undefined) reply.header(h, res.headers[h])
      return await reply.code(res.statusCode).send(res.body)
    })
    await app.listen({ port: settings.port, host: settings.host })
  }

  /** SIGTERM/SIGINT: every worker drains (bounded by limits.shutdownTimeout), then the primary exits 0. */
  async shutdown (signal: string): Promise<void> {
    if (this.closing) return
    this.closing = true
    this.logger.info({ signal, workers: this.workers.size }, 'shutting down: workers drain in-flight requests')
    const exits = [...this.workers.values()].map(async (info) => {
      if (info.worker.isDead()) return
      const exited = new Promise<void>((resolve) => info.worker.once('exit', () => resolve()))
      if (info.worker.isConnected()) info.worker.send({ type: 'gatehouse:shutdown' } satisfies ToWorker)
      else info.worker.process.kill('SIGTERM')
      const timer = setTimeout(() => info.worker.process.kill('SIGKILL'), this.config.limits.shutdownTimeout + 5000)
      await exited
      clearTimeout(timer)
    })
    await Promise.all(exits)
    await this.admin?.close()
    this.logger.info('gatehouse cluster stopped')
    this.logger.flush?.()
    process.exit(0)
  }
}

function withAggregators (metrics: MetricJSON[]): MetricJSON[] {
  return metrics.filter((m) => !PER_PROCESS.has(m.name) || m.type !== 'gauge')
    .map((m) => GAUGE_AGGREGATORS[m.name] !== undefined ? { ...m, aggregator: GAUGE_AGGREGATORS[m.name] } : m)
}

function aggregateJSON (sets: MetricJSON[][]): MetricJSON[] {
  const merged = AggregatorRegistry.aggregate(sets)
  // The aggregated registry's metrics hold plain values; read them back synchronously.
  return (merged.getMetricsAsArray() as unknown as Array<{ get: () => MetricJSON }>).map((m) => m.get())
}

async function answerAdmin (app: FastifyInstance | undefined, request: AdminRequest): Promise<AdminResponse> {
  if (app === undefined) return { statusCode: 503, headers: { 'content-type': 'application/json' }, body: '{"status":"starting"}' }
  const res = await app.inject({ method: request.method as 'GET', url: request.url, headers: request.headers, ...(request.body !== undefined ? { payload: request.body } : {}) })
  const headers: Record<string, string> = {}
  for (const h of ADMIN_HEADERS) if (typeof res.headers[h] === 'string') headers[h] = res.headers[h]
  return { statusCode: res.statusCode, headers, body: res.body }
}

/** A worker: one GatewayServer without its own admin listener, steered by the primary over IPC. */
async function runWorker (options: ClusterOptions): Promise<void> {
  const gateway = new GatewayServer({ configFile: options.configFile, overrides: options.overrides, admin: false })
  let stopping: Promise<void> | undefined
  const stop = async (): Promise<void> => {
    stopping ??= gateway.close().then(() => process.exit(0), (err: Error) => {
      gateway.logger.error({ err }, 'worker shutdown failed')
      process.exit(1)
    })
    await stopping
  }
  // The admin API of this worker, never listening: the primary passes admin requests to it.
  const worker: { admin?: FastifyInstance } = {}
  const scrapes = new Map<number, (s: Scrape) => void>()
  let scrapeIds = 0
  process.on('message', (message: ToWorker) => {
    if (message.type === 'gatehouse:admin') {
      void answerAdmin(worker.admin, message.request).then((response) => process.send?.({ type: 'gatehouse:admin', id: message.id, response } satisfies FromWorker))
    } else if (message.type === 'gatehouse:scraped') {
      scrapes.get(message.id)?.(message.scrape)
      scrapes.delete(message.id)
    } else if (message.type === 'gatehouse:reload') {
      void gateway.reload().then((result) => process.send?.({ type: 'gatehouse:reloaded', id: message.id, result } satisfies FromWorker))
    } else if (message.type === 'gatehouse:metrics') {
      void registry.getMetricsAsJSON().then((metrics) => process.send?.({ type: 'gatehouse:metrics', id: message.id, metrics: metrics as unknown as MetricJSON[] } satisfies FromWorker))
    } else if (message.type === 'gatehouse:shutdown') {
      void stop()
    }
  })
  // Ctrl-C reaches every process of the group; an orphaned worker (primary gone) drains too.
  process.on('SIGTERM', () => { void stop() })
  process.on('SIGINT', () => { void stop() })
  process.on('SIGHUP', () => { void gateway.reload() })
  process.on('disconnect', () => { void stop() })
  setScrapeSource(async () => await new Promise<Scrape>((resolve) => {
    const id = ++scrapeIds
    scrapes.set(id, resolve)
    process.send?.({ type: 'gatehouse:scrape', id } satisfies FromWorker)
  }))
  await gateway.start()
  const adminApp = Fastify({ loggerInstance: gateway.logger as FastifyBaseLogger, logController: new LogController({ disableRequestLogging: true }) }) as unknown as FastifyInstance
  await adminApp.register(admin, { gateway })
  await adminApp.ready()
  worker.admin = adminApp
  process.send?.({ type: 'gatehouse:ready', version: gateway.version, routes: gateway.routes.length, port: gateway.address().port } satisfies FromWorker)
}
