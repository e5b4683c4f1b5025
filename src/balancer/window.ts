/**
 * Successes and failures over the last `window` ms, in ten buckets, so old results age out
 * without keeping one entry per request.
 */
export class RollingCounts {
  private readonly bucketMs: number
  private readonly ok: number[] = new Array(10).fill(0)
  private readonly failed: number[] = new Array(10).fill(0)
  private readonly epoch: number[] = new Array(10).fill(-1)

  constructor (window: number) {
    this.bucketMs = Math.max(1, Math.ceil(window / 10))
  }

  add (now: number, ok: boolean): void {
    const e = Math.floor(now / this.bucketMs)
    const i = e % 10
    if (this.epoch[i] !== e) {
      this.epoch[i] = e
      this.ok[i] = 0
      this.failed[i] = 0
    }
    if (ok) this.ok[i]++
    else this.failed[i]++
  }

  totals (now: number): { ok: number, failed: number } {
    const e = Math.floor(now / this.bucketMs)
    let ok = 0
    let failed = 0
    for (let i = 0; i < 10; i++) {
      if (e - this.epoch[i] < 10) {
        ok += this.ok[i]
        failed += this.failed[i]
      }
    }
    return { ok, failed }
  }

  reset (): void {
    this.epoch.fill(-1)
  }
}
