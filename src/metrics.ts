import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

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
  authFailures: new Counter({ name: 'gatehouse_auth_failures_total', help: 'Requests refused by authentication, by reason', labelNames: ['route', 'reason'] as const, registers: [registry] })
}

/** The route label of requests that matched no route. */
export const NO_ROUTE = '(none)'
