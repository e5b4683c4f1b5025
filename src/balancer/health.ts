import type { FastifyBaseLogger } from 'fastify'
import type { Dispatcher } from 'undici'
import { metrics } from '../metrics.js'
import type { UpstreamPool } from './pool.js'
import type { Target } from './target.js'

export interface HealthCheckOptions {
  path: string
  /** ms between the end of one probe and the start of the next (jittered). */
  interval: number
  /** ms a probe may take, headers and body. */
  timeout: number
  healthyThreshold: number
  unhealthyThreshold: number
  /** Statuses that pass; 200-399 when unset. */
  expectStatus?: readonly number[]
}

interface Probe {
  timer?: NodeJS.Timeout
  abort?: AbortController
  passes: number
  fails: number
}

/**
 * Active health checks of one route's targets: each target is probed with GET `path` every
 * `interval` (±10 % jitter, the first probe at a random offset, so targets and gateways do not
 * probe in lockstep), one probe at a time per target. A target turns unhealthy after
 * `unhealthyThreshold` failures in a row and healthy after `healthyThreshold` passes in a row.
 * It runs from the route version's onReady to its onClose, so a reload that drops the route stops it.
 */
export class HealthChecker {
  private readonly pool: UpstreamPool
  private readonly opts: HealthCheckOptions
  private readonly dispatcher: Dispatcher
  private readonly log: FastifyBaseLogger | undefined
  private readonly probes = new Map<Target, Probe>()
  private running = false

  constructor (pool: UpstreamPool, opts: HealthCheckOptions, dispatcher: Dispatcher, log?: FastifyBaseLogger) {
    this.pool = pool
    this.opts = opts
    this.dispatcher = dispatcher
    this.log = log
    pool.hasHealthCheck = true
  }

  start (): void {
    if (this.running) return
    this.running = true
    for (const t of this.pool.targets) {
      const probe: Probe = { passes: 0, fails: 0 }
      this.probes.set(t, probe)
      this.schedule(t, probe, Math.random() * this.opts.interval)
    }
  }

  stop (): void {
    this.running = false
    for (const probe of this.probes.values()) {
      clearTimeout(probe.timer)
      probe.abort?.abort()
    }
    this.probes.clear()
  }

  private schedule (t: Target, probe: Probe, delay: number): void {
    if (!this.running) return
    probe.timer = setTimeout(() => { void this.run(t, probe) }, delay)
    probe.timer.unref()
  }

  private async run (t: Target, probe: Probe): Promise<void> {
    const started = performance.now()
    const abort = new AbortController()
    probe.abort = abort
    const timer = setTimeout(() => abort.abort(), this.opts.timeout)
    let status: number | undefined
    let error: string | undefined
    try {
      const res = await this.dispatcher.request({
        origin: t.origin,
        path: this.opts.path,
        method: 'GET',
        headers: { host: t.host, 'user-agent': 'gatehouse-health-check' },
        headersTimeout: this.opts.timeout,
        bodyTimeout: this.opts.timeout,
        signal: abort.signal
      })
      status = res.statusCode
      await res.body.dump()
    } catch (err) {
      error = abort.signal.aborted ? 'TIMEOUT' : (err as NodeJS.ErrnoException).code ?? 'ERROR'
    } finally {
      clearTimeout(timer)
      probe.abort = undefined
    }
    if (!this.running) return
    const ok = error === undefined && status !== undefined && (this.opts.expectStatus?.includes(status) ?? (status >= 200 && status < 400))
    t.lastCheck = { at: Date.now(), ok, ms: Math.round(performance.now() - started), ...(status !== undefined ? { status } : {}), ...(error !== undefined ? { error } : {}) }
    this.update(t, probe, ok)
    this.schedule(t, probe, this.opts.interval * (0.9 + Math.random() * 0.2))
  }

  private update (t: Target, probe: Probe, ok: boolean): void {
    if (ok) {
      probe.fails = 0
      probe.passes++
      if (!t.healthy && probe.passes >= this.opts.healthyThreshold) {
        t.healthy = true
        this.log?.info({ route: this.pool.route, target: t.origin }, 'upstream target is healthy again')
        this.pool.updateHealthMetric(t)
      }
    } else {
      probe.passes = 0
      probe.fails++
      if (t.healthy && probe.fails >= this.opts.unhealthyThreshold) {
        t.healthy = false
        this.log?.warn({ route: this.pool.route, target: t.origin, check: t.lastCheck }, 'upstream target is unhealthy')
        metrics.upstreamHealthy.set(this.pool.labels(t), 0)
      }
    }
  }
}
