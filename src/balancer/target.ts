/** One upstream target of a route: its address and the live state the balancer and health checks keep. */
export class Target {
  readonly url: string
  /** scheme://host:port, the key of its undici pool and its metric label. */
  readonly origin: string
  readonly weight: number
  /** Requests sent to it and not yet finished. */
  inflight = 0
  /** Active health: false once unhealthyThreshold probes in a row failed. */
  healthy = true
  /** Passive health: ejected until this time (ms since epoch), 0 when not ejected. */
  ejectedUntil = 0

  constructor (url: string, weight = 1) {
    const u = new URL(url)
    this.url = url
    this.origin = u.origin
    this.weight = weight
  }

  /** Whether a balancer may pick it now. */
  available (now: number): boolean {
    return this.healthy && this.ejectedUntil <= now
  }
}
