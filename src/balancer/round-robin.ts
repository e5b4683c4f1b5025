import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/** Each available target in turn, weights ignored. */
export class RoundRobin implements Algorithm {
  readonly name = 'round-robin'
  private next = 0

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    const n = targets.length
    for (let i = 0; i < n; i++) {
      const idx = (this.next + i) % n
      const t = targets[idx]
      if (ok(t)) {
        this.next = (idx + 1) % n
        return t
      }
    }
    return undefined
  }
}
