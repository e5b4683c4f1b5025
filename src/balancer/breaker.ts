import { RollingCounts } from './window.js'

export interface BreakerOptions {
  /** Failures / requests over the window at which the circuit opens. */
  failureRatio: number
  /** Fewer requests than this in the window never open it. */
  minRequests: number
  /** ms */
  window: number
  /** ms the circuit stays open before letting probes through. */
  openFor: number
  /** Probe requests let through while half-open; all must succeed to close it. */
  halfOpenRequests: number
}

export type CircuitState = 'closed' | 'open' | 'half-open'

/** Whether an attempt was one of the half-open probes (its result decides the circuit). */
export type Admission = 'normal' | 'probe'

/**
 * A per-target circuit breaker: closed while the failure ratio over the window stays under
 * `failureRatio`; open (nothing is sent) for `openFor`; then half-open, where a trickle of
 * `halfOpenRequests` probe requests decides: all succeed -> closed, any fails -> open again.
 */
export class CircuitBreaker {
  state: CircuitState = 'closed'
  /** When the circuit last opened (ms since epoch), 0 if never. */
  openedAt = 0
  /** How many times it opened. */
  opened = 0
  private readonly opts: BreakerOptions
  private readonly counts: RollingCounts
  private probesInFlight = 0
  private probesPassed = 0
  private readonly onChange: (state: CircuitState) => void

  constructor (opts: BreakerOptions, onChange: (state: CircuitState) => void = () => {}) {
    this.opts = opts
    this.counts = new RollingCounts(opts.window)
    this.onChange = onChange
  }

  /** ms until the circuit lets probes through; 0 when not open. */
  retryIn (now: number): number {
    return this.state === 'open' ? Math.max(0, this.openedAt + this.opts.openFor - now) : 0
  }

  /** Whether a request may be sent now (a half-open circuit admits a few probes). */
  allows (now: number): boolean {
    if (this.state === 'closed') return true
    if (this.state === 'open') {
      if (now < this.openedAt + this.opts.openFor) return false
      this.set('half-open')
      this.probesInFlight = 0
      this.probesPassed = 0
    }
    return this.probesInFlight + this.probesPassed < this.opts.halfOpenRequests
  }

  /** Called when an attempt is sent; its admission goes back with the result. */
  admit (now: number): Admission {
    if (this.state === 'half-open' || (this.state === 'open' && this.allows(now))) {
      this.probesInFlight++
      return 'probe'
    }
    return 'normal'
  }

  /** An attempt ended without a verdict (the client went away): its probe slot is free again. */
  release (admission: Admission): void {
    if (admission === 'probe') this.probesInFlight = Math.max(0, this.probesInFlight - 1)
  }

  record (now: number, admission: Admission, ok: boolean): void {
    if (admission === 'probe') {
      this.probesInFlight = Math.max(0, this.probesInFlight - 1)
      if (this.state !== 'half-open') return
      if (!ok) {
        this.trip(now)
      } else if (++this.probesPassed >= this.opts.halfOpenRequests) {
        this.counts.reset()
        this.set('closed')
      }
      return
    }
    // Results of requests sent before the circuit opened do not move it.
    if (this.state !== 'closed') return
    this.counts.add(now, ok)
    if (ok) return
    const { ok: passed, failed } = this.counts.totals(now)
    const total = passed + failed
    if (total >= this.opts.minRequests && failed / total >= this.opts.failureRatio) this.trip(now)
  }

  private trip (now: number): void {
    this.openedAt = now
    this.opened++
    this.probesInFlight = 0
    this.probesPassed = 0
    this.set('open')
  }

  private set (state: CircuitState): void {
    if (this.state === state) return
    this.state = state
    this.onChange(state)
  }
}
