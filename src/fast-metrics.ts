import type { Metric, Registry } from 'prom-client'

/*
 * Counters, histograms and a gauge recorded with plain number arithmetic, exposed through
 * prom-client's registry (text format, cluster aggregation, default metrics stay prom-client's).
 *
 * prom-client's own metrics build, validate and hash a label object on every inc() or observe(),
 * even through a labels() child: about 5 % of the plain route's CPU per request (profile,
 * 2026-11-23). Here a child is resolved once per label combination, and each event afterwards is
 * an addition. A metric object is what prom-client's Registry asks of one: name, help, type,
 * aggregator, get() in the shape prom-client's own metrics return, and reset().
 */

type Labels = Record<string, string>

/** What get() returns: prom-client's metric JSON (getMetricsAsJSON, the cluster aggregator). */
export interface MetricJson {
  name: string
  help: string
  type: 'counter' | 'histogram' | 'gauge'
  values: Array<{ value: number, labels: Labels, metricName?: string }>
  aggregator: 'sum'
}

interface Options<N extends string> {
  name: string
  help: string
  labelNames?: readonly N[]
  registers?: Registry[]
}

/** The child of one label combination, checked once. */
abstract class Labelled<N extends string, C> {
  readonly name: string
  readonly help: string
  readonly labelNames: readonly N[]
  readonly aggregator = 'sum' as const
  protected readonly children = new Map<string, C>()

  constructor (opts: Options<N>) {
    this.name = opts.name
    this.help = opts.help
    this.labelNames = opts.labelNames ?? []
    for (const r of opts.registers ?? []) r.registerMetric(this as unknown as Metric)
  }

  protected abstract create (labels: Labels): C

  /** The child for these label values, in labelNames order. */
  labels (...values: string[]): C {
    const key = values.length === 1 ? values[0] : values.join('\u0000')
    let child = this.children.get(key)
    if (child === undefined) {
      if (values.length !== this.labelNames.length) throw new Error(`${this.name}: ${this.labelNames.length} label values expected, got ${values.length}`)
      const labels: Labels = {}
      this.labelNames.forEach((n, i) => { labels[n] = String(values[i]) })
      child = this.create(labels)
      this.children.set(key, child)
    }
    return child
  }

  protected child (labels: Partial<Record<N, string>> | undefined): C {
    const values = this.labelNames.map((n) => {
      const v = labels?.[n]
      if (v === undefined) throw new Error(`${this.name}: label ${n} missing`)
      return String(v)
    })
    return this.labels(...values)
  }
}

interface CounterChild { labels: Labels, value: number, inc: (n?: number) => void }

export class FastCounter<N extends string = string> extends Labelled<N, CounterChild> {
  readonly type = 'counter' as const

  protected create (labels: Labels): CounterChild {
    const c: CounterChild = {
      labels,
      value: 0,
      inc (n = 1) {
        if (!(n >= 0) || !Number.isFinite(n)) throw new TypeError(`a counter increases by a finite, non-negative number, not ${n}`)
        c.value += n
      }
    }
    return c
  }

  inc (labels?: Partial<Record<N, string>>, n = 1): void {
    this.child(labels).inc(n)
  }

  async get (): Promise<MetricJson> {
    const values = [...this.children.values()].map((c) => ({ value: c.value, labels: { ...c.labels } }))
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator }
  }

  reset (): void {
    for (const c of this.children.values()) c.value = 0
  }
}

interface HistogramChild { labels: Labels, counts: Float64Array, sum: number, count: number, observe: (seconds: number) => void }

export class FastHistogram<N extends string = string> extends Labelled<N, HistogramChild> {
  readonly type = 'histogram' as const
  readonly buckets: readonly number[]

  constructor (opts: Options<N> & { buckets: readonly number[] }) {
    super(opts)
    this.buckets = [...opts.buckets].sort((a, b) => a - b)
  }

  protected create (labels: Labels): HistogramChild {
    const bounds = this.buckets
    const h: HistogramChild = {
      labels,
      counts: new Float64Array(bounds.length),
      sum: 0,
      count: 0,
      observe (v: number) {
        if (!Number.isFinite(v)) throw new TypeError(`not a finite number: ${v}`)
        h.sum += v
        h.count++
        for (let i = 0; i < bounds.length; i++) {
          if (v <= bounds[i]) {
            h.counts[i]++
            return
          }
        }
      }
    }
    return h
  }

  observe (labels: Partial<Record<N, string>>, v: number): void {
    this.child(labels).observe(v)
  }

  async get (): Promise<MetricJson> {
    const values: Array<{ value: number, labels: Labels, metricName: string }> = []
    for (const h of this.children.values()) {
      let acc = 0
      for (let i = 0; i < this.buckets.length; i++) {
        acc += h.counts[i]
        values.push({ value: acc, labels: { le: String(this.buckets[i]), ...h.labels }, metricName: `${this.name}_bucket` })
      }
      values.push({ value: h.count, labels: { le: '+Inf', ...h.labels }, metricName: `${this.name}_bucket` })
      values.push({ value: h.sum, labels: { ...h.labels }, metricName: `${this.name}_sum` })
      values.push({ value: h.count, labels: { ...h.labels }, metricName: `${this.name}_count` })
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator }
  }

  reset (): void {
    for (const h of this.children.values()) {
      h.counts.fill(0)
      h.sum = 0
      h.count = 0
    }
  }
}

/** A gauge without labels that goes up and down on the hot path (requests in flight). */
export class FastGauge {
  readonly name: string
  readonly help: string
  readonly type = 'gauge' as const
  readonly aggregator = 'sum' as const
  readonly labelNames: readonly string[] = []
  private value = 0

  constructor (opts: Options<never>) {
    this.name = opts.name
    this.help = opts.help
    for (const r of opts.registers ?? []) r.registerMetric(this as unknown as Metric)
  }

  inc (n = 1): void { this.value += n }
  dec (n = 1): void { this.value -= n }
  set (v: number): void { this.value = v }

  async get (): Promise<MetricJson> {
    return { name: this.name, help: this.help, type: this.type, values: [{ value: this.value, labels: {} }], aggregator: this.aggregator }
  }

  reset (): void { this.value = 0 }
}
