import type { Readable } from 'node:stream'

/** Whether a body or payload is a stream (anything with pipe), as Fastify and reply-from tell them apart. */
export function isStream (value: unknown): value is Readable {
  return value !== null && typeof value === 'object' && typeof (value as { pipe?: unknown }).pipe === 'function'
}
