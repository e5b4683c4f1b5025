import { Gauge, Registry, collectDefaultMetrics } from 'prom-client'
import { FastCounter as Counter, FastGauge, FastHistogram as Histogram } from './fast-metrics.js'

/*
 * The gateway's metrics (DESIGN.md §6), one registry per process, created once: a reload keeps
 * every counter. Each concern increments its own metric here; plugins/metrics.ts records requests
 * and serves the text format. Label values are route names, configured targets and status codes
 * only, never raw paths, so cardinality stays bounded whatever clients send.
 */
export const registry = new Registry()
collectDefaultMetrics({ register: registry })

/** From 1 ms to 30 s: proxy latencies, not page loads. */
export const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

export const metrics = {
  requests: new Counter({ name: 'gatehouse_requests_total', help: 'Requests answered, by route, method and status', labelNames: ['route', 'method', 'status'] as const, registers: [registry] }),
  requestDuration: new Histogram({ name: 'gatehouse_request_duration_seconds', help: 'Time from request to response end, by route and method', labelNames: ['route', 'method'] as const, buckets: LATENCY_BUCKETS, registers: [registry] }),
  upstreamRequests: new Counter({ name: 'gatehouse_upstream_requests_total', help: 'Requests sent to upstream targets, by outcome (ok, error, timeout, retried, circuit_open)', labelNames: ['route', 'target', 'outcome'] as const, registers: [registry] }),
  upstreamDuration: new Histogram({ name: 'gatehouse_upstream_duration_seconds', help: 'Time until the upstream response headers arrived', labelNames: ['route', 'target'] as const, buckets: LATENCY_BUCKETS, registers: [registry] }),
  upstreamHealthy: new Gauge({ name: 'gatehouse_upstream_healthy', help: '1 when the target is healthy (active and passive checks), else 0', labelNames: ['route', 'target'] as const, registers: [registry] }),
  circuitOpen: new Gauge({ name: 'gatehouse_circuit_open', help: '1 while the target circuit breaker is open or half-open', labelNames: ['route', 'target'] as const, registers: [registry] }),
  cache: new Counter({ name: 'gatehouse_cache_total', help: 'Cache lookups on cached routes, by result (hit, miss, stale, bypass)', labelNames: ['route', 'result'] as const, registers: [registry] }),
  rateLimited: new Counter({ name: 'gatehouse_rate_limited_total', help: 'Requests refused with 429', labelNames: ['route'] as const, registers: [registry] }),
  authFailures: new Counter({ name: 'gatehouse_auth_failures_total', help: 'Requests refused by authentication, by reason', labelNames: ['route', 'reason'] as const, registers: [registry] }),
  inflight: new FastGauge({ name: 'gatehouse_requests_in_flight', help: 'Requests received and not yet answered', registers: [registry] }),
  websocketConnections: new Gauge({ name: 'gatehouse_websocket_connections', help: 'WebSocket connections open, by route', labelNames: ['route'] as const, registers: [registry] }),
  configReloads: new Counter({ name: 'gatehouse_config_reloads_total', help: 'Route-table reloads, by result (ok, failed)', labelNames: ['result'] as const, registers: [registry] }),
  configVersion: new Gauge({ name: 'gatehouse_config_version', help: 'The version of the route table in service (1 at start, +1 per successful reload)', registers: [registry] }),
  configReloadTime: new Gauge({ name: 'gatehouse_config_last_reload_success_timestamp_seconds', help: 'When the route table in service was loaded (Unix time)', registers: [registry] }),
  parserRefused: new Counter({ name: 'gatehouse_parser_refused_total', help: 'Requests the HTTP parser refused before routing, by status (400 malformed, 408 too slow, 431 headers too large)', labelNames: ['status'] as const, registers: [registry] })
}

// Series that exist before the first event, so that rate() and alerts see a 0 rather than nothing.
metrics.configReloads.inc({ result: 'ok' }, 0)
metrics.configReloads.inc({ result: 'failed' }, 0)
metrics.inflight.set(0)
for (const status of ['400', '408', '431']) metrics.parserRefused.inc({ status }, 0)

/** Counts a request Node's parser refused (server.ts clientError): it never reaches a route. */
export function recordParserRefusal (status: number): void {
  metrics.parserRefused.inc({ status: String(status) })
}

/** Records a route-table load: the first one at start, then each reload (server.ts). */
export function recordConfigLoad (ok: boolean, version: number): void {
  if (!ok) {
    metrics.configReloads.inc({ result: 'failed' })
    return
  }
  if (version > 1) metrics.configReloads.inc({ result: 'ok' })
  metrics.configVersion.set(version)
  metrics.configReloadTime.set(Date.now() / 1000)
}

export interface Scrape {
  contentType: string
  body: string
}

/** The scrape of this process: its own registry. */
export async function scrapeProcess (): Promise<Scrape> {
  return { contentType: registry.contentType, body: await registry.metrics() }
}

let source: () => Promise<Scrape> = scrapeProcess

/**
 * What /metrics serves. Cluster mode (src/cluster.ts) replaces the source with one that
 * aggregates every worker's registry (prom-client's AggregatorRegistry, fed by `registry` in each
 * worker), so one scrape reports the whole process group.
 */
export function setScrapeSource (fn: () => Promise<Scrape>): void {
  source = fn
}

export async function scrape (): Promise<Scrape> {
  return await source()
}

/** The route label of requests that matched no route. */
export const NO_ROUTE = '(none)'
