import proxyAddr from '@fastify/proxy-addr'

/**
 * Compiles `trustProxy` into the function Fastify and the forwarding code share. Only a list of
 * addresses or CIDRs is accepted (see PITFALLS.md): `true` believes any client's X-Forwarded-For
 * and a hop count believes nobody since fastify 5.12.
 */
export function compileTrust (trustProxy: false | string | readonly string[]): (address: string, hop?: number) => boolean {
  if (trustProxy === false) return () => false
  const list = typeof trustProxy === 'string' ? [trustProxy] : [...trustProxy]
  if (list.length === 0) return () => false
  const trust = proxyAddr.compile(list)
  return (address: string, hop = 0) => trust(address, hop)
}
