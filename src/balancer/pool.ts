import type { FastifyRequest } from 'fastify'
import type { RouteDefinition } from '../config.js'
import { metrics } from '../metrics.js'
import type { Algorithm } from './algorithm.js'
import { CircuitBreaker, type Admission } from './breaker.js'
import { RetryBudget } from './budget.js'
import { ConsistentHash } from './consistent-hash.js'
import { LeastConnections } from './least-connections.js'
import { PowerOfTwo } from './p2c.js'
import { Random } from './random.js'
import { RoundRobin } from './round-robin.js'
import { Target, type CheckResult, type FailureKind } from './target.js'
import { Weighted } from './weighted.js'

type Upstream = NonNullable<RouteDefinition['upstream']>

export function createAlgorithm (name: string, targets: readonly Target[], hashKey?: string): Algorithm {
  switch (name) {
    case 'weighted': return new Weighted()
    case 'least-connections': return new LeastConnections()
    case 'p2c': return new PowerOfTwo()
    case 'random': return new Random()
    case 'consistent-hash': return new ConsistentHash(targets, hashKey)
    default: return new RoundRobin()
  }
}

/** gatehouse_upstream_requests_total outcomes. */
export type Outcome = 'ok' | 'error' | 'timeout' | 'retried' | 'circuit_open'

/** One target's metric children, looked up once instead of per request. */
interface TargetMetrics {
  outcomes: Record<Outcome, { inc: () => void }>
  duration: { observe: (seconds: number) => void }
}

/** The result of one attempt at a target, as the pool counts it. */
export type AttemptResult = { ok: true } | { ok: false, kind: FailureKind, status?: number }

/** What GET /upstreams shows of one target. */
export interface TargetStatus {
  url: string
  weight: number
  /** Picked by the balancer now. */
  available: boolean
  /** Active health checks pass and passive health has not ejected it. */
  healthy: boolean
  ejectedUntil: string | null
  ejections: number
  circuit: 'closed' | 'open' | 'half-open'
  inflight: number
  consecutiveFailures: number
  recentFailures: number
  lastFailure: { at: string, kind: FailureKind, status?: number } | null
  lastCheck: (Omit<CheckResult, 'at'> & { at: string }) | null
}

export interface RouteUpstreamStatus {
  route: string
  balancer: string
  healthCheck: boolean
  targets: TargetStatus[]
}

/** Picks a target for a request among the route's available targets. */
export interface Balancer {
  readonly targets: readonly Target[]
  /** A target other than those in `exclude`, or undefined when none is available. */
  pick (request: FastifyRequest, exclude?: ReadonlySet<Target>): Target | undefined
  /** The live state of the route's targets, for the admin API. */
  status? (now?: number): RouteUpstreamStatus
}

/**
 * The targets of one route and everything that decides which may take a request: the balancing
 * algorithm, active health (set by the health checker), passive outlier detection, per-target
 * circuit breakers and the route's retry budget. Every attempt's result comes back through
 * `started`/`finished`, which keep in-flight counts, breakers, ejections and metrics.
 */
export class UpstreamPool implements Balancer {
  readonly route: string
  readonly targets: readonly Target[]
  readonly algorithm: Algorithm
  readonly budget: RetryBudget
  hasHealthCheck = false
  private readonly passive: Upstream['passive']
  private readonly maxEjectFor: number
  private readonly timers = new Set<NodeJS.Timeout>()
  private readonly children = new Map<Target, TargetMetrics>()

  constructor (route: string, up: Upstream, targets: readonly Target[] = up.targets.map((t) => new Target(t.url, t.weight))) {
    this.route = route
    this.targets = targets
    this.algorithm = createAlgorithm(up.balancer, targets, up.hashKey)
    this.budget = new RetryBudget(up.retries.budget ?? 0.2)
    this.passive = up.passive
    this.maxEjectFor = up.passive?.maxEjectFor ?? Math.max(up.passive?.ejectFor ?? 0, 300_000)
    for (const t of targets) {
      const cb = up.circuitBreaker
      if (cb !== undefined) {
        t.breaker = new CircuitBreaker(cb, (state) => {
          metrics.circuitOpen.set(this.labels(t), state === 'closed' ? 0 : 1)
        })
      }
      metrics.circuitOpen.set(this.labels(t), 0)
      metrics.upstreamHealthy.set(this.labels(t), 1)
    }
  }

  labels (t: Target): { route: string, target: string } {
    return { route: this.route, target: t.origin }
  }

  /** Counts one attempt at `t` (target label: its origin). */
  count (t: Target, outcome: Outcome): void {
    this.metricsOf(t).outcomes[outcome].inc()
  }

  /** Records the time until `t`'s response headers came. */
  observe (t: Target, ms: number): void {
    this.metricsOf(t).duration.observe(ms / 1000)
  }

  private metricsOf (t: Target): TargetMetrics {
    let m = this.children.get(t)
    if (m === undefined) {
      const c = (outcome: Outcome): { inc: () => void } => metrics.upstreamRequests.labels(this.route, t.origin, outcome)
      m = {
        outcomes: { ok: c('ok'), error: c('error'), timeout: c('timeout'), retried: c('retried'), circuit_open: c('circuit_open') },
        duration: metrics.upstreamDuration.labels(this.route, t.origin)
      }
      this.children.set(t, m)
    }
    return m
  }

  pick (request: FastifyRequest, exclude?: ReadonlySet<Target>): Target | undefined {
    const now = Date.now()
    const ok = exclude === undefined || exclude.size === 0
      ? (t: Target) => t.available(now)
      : (t: Target) => t.available(now) && !exclude.has(t)
    return this.algorithm.pick(this.targets, ok, request)
  }

  /**
   * Why nothing can be picked: `circuit` when every target that is otherwise up has its circuit
   * open, and the seconds after which trying again makes sense (for Retry-After).
   */
  unavailable (now = Date.now()): { circuit: boolean, retryAfter: number } {
    let circuit = false
    let soonest = Infinity
    for (const t of this.targets) {
      if (!t.healthy) continue
      let at = Math.max(t.ejectedUntil, t.retryAfterUntil)
      const breakerIn = t.breaker?.retryIn(now) ?? 0
      if (breakerIn > 0) {
        circuit = true
        at = Math.max(at, now + breakerIn)
      }
      soonest = Math.min(soonest, at)
    }
    // Down by active health only: the next probes decide, a few seconds is a fair guess.
    const retryAfter = soonest === Infinity ? 5 : Math.min(300, Math.max(1, Math.ceil((soonest - now) / 1000)))
    const allOpen = circuit && this.targets.every((t) => !t.healthy || (t.breaker?.retryIn(now) ?? 0) > 0 || t.ejectedUntil > now)
    return { circuit: allOpen, retryAfter }
  }

  /** Called as an attempt is sent to `t`. */
  started (t: Target, now = Date.now()): Admission {
    t.inflight++
    return t.breaker?.admit(now) ?? 'normal'
  }

  /**
   * Called with the attempt's result once its response headers (or its error) came; null when
   * the client went away first, which says nothing about the target.
   */
  finished (t: Target, admission: Admission, result: AttemptResult | null, now = Date.now()): void {
    t.inflight = Math.max(0, t.inflight - 1)
    if (result === null) {
      t.breaker?.release(admission)
      return
    }
    t.breaker?.record(now, admission, result.ok)
    if (result.ok) {
      t.noteSuccess()
      // An ejection streak ends once the target has served well for a while after coming back.
      if (t.ejections > 0 && this.passive !== undefined && now > t.ejectedUntil + this.passive.ejectFor) t.ejections = 0
      return
    }
    t.noteFailure(now, result.kind, result.status)
    if (this.passive !== undefined && t.consecutiveFailures >= this.passive.consecutiveFailures && t.ejectedUntil <= now) this.eject(t, now)
  }

  /** Not picked until `until` (ms since epoch): the target asked for it with Retry-After. */
  backOff (t: Target, until: number): void {
    t.retryAfterUntil = Math.max(t.retryAfterUntil, until)
  }

  /** Passive ejection, never of more than maxEjectedPercent of the route's targets. */
  private eject (t: Target, now: number): void {
    const passive = this.passive
    if (passive === undefined) return
    const ejected = this.targets.filter((x) => x.ejectedUntil > now).length
    if (ejected + 1 > Math.floor(this.targets.length * passive.maxEjectedPercent / 100)) return
    const duration = Math.min(this.maxEjectFor, passive.ejectFor * 2 ** t.ejections)
    t.ejections++
    t.ejectedUntil = now + duration
    t.consecutiveFailures = 0
    metrics.upstreamHealthy.set(this.labels(t), 0)
    const timer = setTimeout(() => {
      this.timers.delete(timer)
      this.updateHealthMetric(t)
    }, duration + 1)
    timer.unref()
    this.timers.add(timer)
  }

  /**
   * Takes over active health from the previous route-table version's targets (by route and
   * origin), so a reload during an outage does not send traffic to a target known to be down
   * until the new probes find out again. `seen` lives as long as the process.
   */
  inherit (seen: Map<string, Target>): void {
    for (const t of this.targets) {
      const key = `${this.route} ${t.origin}`
      const prev = seen.get(key)
      if (prev !== undefined && prev !== t) {
        t.healthy = prev.healthy
        t.lastCheck = prev.lastCheck
        this.updateHealthMetric(t)
      }
      seen.set(key, t)
    }
  }

  updateHealthMetric (t: Target): void {
    metrics.upstreamHealthy.set(this.labels(t), t.up(Date.now()) ? 1 : 0)
  }

  close (): void {
    for (const timer of this.timers) clearTimeout(timer)
    this.timers.clear()
  }

  status (now = Date.now()): RouteUpstreamStatus {
    const iso = (ms: number): string => new Date(ms).toISOString()
    return {
      route: this.route,
      balancer: this.algorithm.name,
      healthCheck: this.hasHealthCheck,
      targets: this.targets.map((t) => {
        const last = t.failures.at(-1)
        return {
          url: t.url,
          weight: t.weight,
          available: t.available(now),
          healthy: t.up(now),
          ejectedUntil: t.ejectedUntil > now ? iso(t.ejectedUntil) : null,
          ejections: t.ejections,
          circuit: t.breaker?.state === 'open' && t.breaker.retryIn(now) === 0 ? 'half-open' : t.breaker?.state ?? 'closed',
          inflight: t.inflight,
          consecutiveFailures: t.consecutiveFailures,
          recentFailures: t.recentFailures(now),
          lastFailure: last === undefined ? null : { ...last, at: iso(last.at) },
          lastCheck: t.lastCheck === undefined ? null : { ...t.lastCheck, at: iso(t.lastCheck.at) }
        }
      })
    }
  }
}
