import { createHmac, sign, generateKeyPairSync, type KeyObject } from 'node:crypto'

/* Test-only JWT minting with node:crypto, so tests do not lean on the library under test. */

const b64 = (v: unknown): string => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url')

export const now = (): number => Math.floor(Date.now() / 1000)

export function hsToken (secret: string, payload: Record<string, unknown>, header: Record<string, unknown> = {}): string {
  const alg = (header.alg as string | undefined) ?? 'HS256'
  const input = `${b64({ alg, typ: 'JWT', ...header })}.${b64(payload)}`
  const hash = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg] ?? 'sha256'
  return `${input}.${createHmac(hash, secret).update(input).digest('base64url')}`
}

export function rsToken (key: KeyObject, payload: Record<string, unknown>, header: Record<string, unknown> = {}): string {
  const input = `${b64({ alg: 'RS256', typ: 'JWT', ...header })}.${b64(payload)}`
  return `${input}.${sign('sha256', Buffer.from(input), key).toString('base64url')}`
}

export function noneToken (payload: Record<string, unknown>): string {
  return `${b64({ alg: 'none', typ: 'JWT' })}.${b64(payload)}.`
}

export function rsaPair (): { privateKey: KeyObject, publicKey: KeyObject, publicPem: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  return { privateKey, publicKey, publicPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() }
}
