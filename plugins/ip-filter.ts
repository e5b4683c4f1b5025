import fp from 'fastify-plugin'
import type { FastifyPluginAsync } from 'fastify'
import proxyAddr from '@fastify/proxy-addr'
import { GATEHOUSE_IP_DENIED } from '../src/errors.js'
import { metrics } from '../src/metrics.js'
import { routeConfig } from '../src/fastify-internals.js'

export interface IpLists { allow: readonly string[], deny: readonly string[] }

/**
 * Compiles allow/deny lists of addresses and CIDRs (and proxy-addr's names: loopback, linklocal,
 * uniquelocal) into one check. A deny entry always wins; a non-empty allow list admits only its
 * entries. IPv4-mapped IPv6 addresses (::ffff:10.0.0.1) are matched as the IPv4 address.
 * Returns undefined when both lists are empty.
 */
export function compileIpFilter (lists: IpLists | undefined): ((ip: string) => boolean) | undefined {
  if (lists === undefined || (lists.allow.length === 0 && lists.deny.length === 0)) return undefined
  const deny = lists.deny.length > 0 ? proxyAddr.compile([...lists.deny]) : undefined
  const allow = lists.allow.length > 0 ? proxyAddr.compile([...lists.allow]) : undefined
  return (ip: string) => {
    if (deny?.(ip, 0) === true) return false
    return allow === undefined || allow(ip, 0)
  }
}

/**
 * IP allow/deny lists, global (`ipFilter`) then per route (route `ipFilter`), checked first thing
 * in onRequest, before any crypto or counting. The address is `request.ip`, i.e. what trustProxy
 * lets X-Forwarded-For say: a client outside trustProxy cannot choose its own address.
 */
const ipFilter: FastifyPluginAsync = async function ipFilter (fastify) {
  const global = compileIpFilter(fastify.gatehouse.config.ipFilter)
  const perRoute = new Map<string, (ip: string) => boolean>()
  for (const route of fastify.gatehouse.routes) {
    const check = compileIpFilter(route.ipFilter)
    if (check !== undefined) perRoute.set(route.name, check)
  }
  if (global === undefined && perRoute.size === 0) return

  fastify.addHook('onRequest', function filterIp (request, _reply, done) {
    const route = routeConfig(request).gatehouse
    const check = route !== undefined ? perRoute.get(route.name) : undefined
    if ((global !== undefined && !global(request.ip)) || (check !== undefined && !check(request.ip))) {
      metrics.authFailures.inc({ route: route?.name ?? '(none)', reason: 'ip_denied' })
      done(new GATEHOUSE_IP_DENIED())
      return
    }
    done()
  })
}

export default fp(ipFilter, { name: 'ip-filter', fastify: '5.x', dependencies: ['problem'] })
