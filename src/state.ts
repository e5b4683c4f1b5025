/**
 * What outlives a route-table version: stores, Redis clients, metric registries. Each is created
 * once per process on first use and closed when the gateway stops, so a reload neither resets a
 * rate-limit counter nor drops the response cache.
 */
export class ProcessState {
  private readonly items = new Map<string, unknown>()
  private readonly closers: Array<() => Promise<void> | void> = []

  /** The item under `key`, created by `create` the first time. */
  get<T> (key: string, create: () => T, close?: (item: T) => Promise<void> | void): T {
    if (this.items.has(key)) return this.items.get(key) as T
    const item = create()
    this.items.set(key, item)
    if (close !== undefined) this.closers.push(() => close(item))
    return item
  }

  async close (): Promise<void> {
    const closers = this.closers.splice(0).reverse()
    for (const c of closers) await c()
    this.items.clear()
  }
}
