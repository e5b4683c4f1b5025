import type { CircuitBreaker } from './breaker.js'

/** Why an attempt at a target failed; what passive health and the breaker count. */
export type FailureKind = 'connect' | 'reset' | 'timeout' | 'status' | 'other'

/** The last active health probe of a target, for the admin API. */
export interface CheckResult {
  at: number
  ok: boolean
  status?: number
  /** The probe's error code (never the message, which may carry addresses). */
  error?: string
  ms: number
}

/** How many recent failures a target remembers for the admin API. */
const RECENT = 10
/** A failure counts as recent for this long. */
const RECENT_MS = 60_000

/** One upstream target of a route: its address and the live state the balancer and health checks keep. */
export class Target {
  readonly url: string
  /** scheme://host:port, the key of its undici pool and its metric label. */
  readonly origin: string
  /** host:port, the Host header it is sent. */
  readonly host: string
  readonly weight: number
  /** Requests sent to it and not yet answered. */
  inflight = 0
  /** Active health: false once unhealthyThreshold probes in a row failed. */
  healthy = true
  /** Passive health: ejected until this time (ms since epoch), 0 when not ejected. */
  ejectedUntil = 0
  /** How many times in a row passive health ejected it (the ejection time doubles each time). */
  ejections = 0
  /** Failed attempts in a row (transport errors, timeouts, 5xx), reset by any success. */
  consecutiveFailures = 0
  /** Not picked before this time: the target answered with Retry-After. */
  retryAfterUntil = 0
  /** The target's circuit breaker, when the route configures one. */
  breaker: CircuitBreaker | undefined
  lastCheck: CheckResult | undefined
  /** The last few failures (time and kind), newest last. */
  readonly failures: Array<{ at: number, kind: FailureKind, status?: number }> = []

  constructor (url: string, weight = 1) {
    const u = new URL(url)
    this.url = url
    this.origin = u.origin
    this.host = u.host
    this.weight = weight
  }

  /** Whether a balancer may pick it now. */
  available (now: number): boolean {
    return this.healthy && this.ejectedUntil <= now && this.retryAfterUntil <= now && (this.breaker === undefined || this.breaker.allows(now))
  }

  /** Healthy for the metric and the admin API: active checks pass and passive health has not ejected it. */
  up (now: number): boolean {
    return this.healthy && this.ejectedUntil <= now
  }

  noteFailure (now: number, kind: FailureKind, status?: number): void {
    this.consecutiveFailures++
    this.failures.push(status === undefined ? { at: now, kind } : { at: now, kind, status })
    if (this.failures.length > RECENT) this.failures.shift()
  }

  noteSuccess (): void {
    this.consecutiveFailures = 0
  }

  recentFailures (now: number): number {
    let n = 0
    for (const f of this.failures) if (now - f.at <= RECENT_MS) n++
    return n
  }
}
