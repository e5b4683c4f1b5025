import type { FastifyContextConfig, FastifyReply, FastifyRequest } from 'fastify'

/*
 * Two of Fastify's internal symbols, read on the hot path instead of the public getters that copy:
 * `request.routeOptions` builds a new object of eleven fields on every access (and the gateway
 * reads the route's config in five hooks per request), and `reply.getHeaders()` merges two
 * objects. Fastify has no package exports map, so lib/symbols.js is reachable; test/internals
 * checks both against the public getters, so an upgrade that moves them fails loudly.
 */
const symbols = require('fastify/lib/symbols.js') as { kRouteContext: symbol, kReplyHeaders: symbol }

const { kRouteContext, kReplyHeaders } = symbols

type WithContext = Record<symbol, { config?: FastifyContextConfig } | undefined>

/** The matched route's config (`request.routeOptions.config`), without building routeOptions. */
export function routeConfig (request: FastifyRequest): FastifyContextConfig {
  return (request as unknown as WithContext)[kRouteContext]?.config ?? request.routeOptions.config
}

export type HeaderValue = string | string[] | number

/** The headers hooks set with reply.header(), the object itself (not to be modified). */
export function replyHeaders (reply: FastifyReply): Readonly<Record<string, HeaderValue | undefined>> {
  return (reply as unknown as Record<symbol, Record<string, HeaderValue | undefined>>)[kReplyHeaders]
}
