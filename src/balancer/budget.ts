/**
 * The retry budget of a route: retries may add at most `ratio` of the route's requests over a
 * sliding window (with a small floor, so a quiet route can still fail over). Without it, a
 * struggling service gets (1 + attempts) times its normal load exactly when it can least take it.
 */
export class RetryBudget {
  private readonly ratio: number
  private readonly floor: number
  private readonly half: number
  private epoch = 0
  private requests = [0, 0]
  private retries = [0, 0]

  constructor (ratio = 0.2, window = 10_000, floor = 3) {
    this.ratio = ratio
    this.floor = floor
    this.half = Math.max(1, Math.floor(window / 2))
  }

  request (now: number): void {
    this.roll(now)
    this.requests[1]++
  }

  /** Takes one retry from the budget; false when the budget is spent. */
  tryRetry (now: number): boolean {
    this.roll(now)
    const requests = this.requests[0] + this.requests[1]
    const retries = this.retries[0] + this.retries[1]
    if (retries >= Math.max(this.floor, this.ratio * requests)) return false
    this.retries[1]++
    return true
  }

  /** Two half-window buckets: the window slides in halves. */
  private roll (now: number): void {
    const e = Math.floor(now / this.half)
    if (e === this.epoch) return
    if (e === this.epoch + 1) {
      this.requests = [this.requests[1], 0]
      this.retries = [this.retries[1], 0]
    } else {
      this.requests = [0, 0]
      this.retries = [0, 0]
    }
    this.epoch = e
  }
}
