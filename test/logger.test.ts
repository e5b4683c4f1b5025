import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Writable } from 'node:stream'
import pino from 'pino'
import { RequestLogger, requestLoggerFactory } from '../src/logger.js'

function capture (): { logger: pino.Logger, lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = []
  const dest = new Writable({ write (chunk: Buffer, _enc, cb) { for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l)); cb() } })
  const logger = pino({ level: 'info', redact: { paths: ['req.headers.authorization'], censor: '[redacted]' } }, dest)
  return { logger, lines }
}

const strip = (line: Record<string, unknown>): Record<string, unknown> => {
  const { time, ...rest } = line
  return rest
}

test('a lazy request logger writes the same fields as a pino child, and makes no child until a line is written', () => {
  const cases: Array<(log: { info: (...a: unknown[]) => void, error: (...a: unknown[]) => void, setBindings: (b: Record<string, string>) => void }) => void> = [
    (log) => { log.setBindings({ traceId: 'abc' }); log.info({ msg: 'request', status: 200, req: { headers: { authorization: 'Bearer secret' } } }) },
    (log) => { log.info({ status: 201 }, 'done %s', 'now') },
    (log) => { log.info('a message only') },
    (log) => { log.error(new Error('boom')) },
    (log) => { log.error({ err: new Error('bang') }, 'unhandled error') }
  ]
  for (const [i, run] of cases.entries()) {
    const a = capture()
    const b = capture()
    run(a.logger.child({ reqId: 'r-1' }))
    run(new RequestLogger(b.logger, { reqId: 'r-1' }))
    assert.equal(b.lines.length, 1, `case ${i}`)
    const theirs = strip(a.lines[0])
    const ours = strip(b.lines[0])
    if (typeof theirs.err === 'object') delete (theirs.err as Record<string, unknown>).stack
    if (typeof ours.err === 'object') delete (ours.err as Record<string, unknown>).stack
    assert.deepEqual(ours, theirs, `case ${i}`)
  }
  // Redaction applies on the lazy path too.
  const c = capture()
  new RequestLogger(c.logger, { reqId: 'r-2' }).info({ req: { headers: { authorization: 'Bearer secret' } } })
  assert.equal((c.lines[0].req as { headers: { authorization: string } }).headers.authorization, '[redacted]')

  // Below the logger's level nothing is written and no child is made.
  const d = capture()
  const lazy = new RequestLogger(d.logger, { reqId: 'r-3' })
  const made = (): boolean => (lazy as unknown as { real?: unknown }).real !== undefined
  lazy.setBindings({ traceId: 't-3' })
  lazy.debug({ x: 1 })
  assert.equal(made(), false)
  assert.equal(d.lines.length, 0)
  lazy.info({ y: 1 })
  assert.equal(made(), true)
  assert.deepEqual([d.lines[0].reqId, d.lines[0].traceId, d.lines[0].y], ['r-3', 't-3', 1])
  lazy.child({ sub: 1 }).info('from a child')
  assert.equal(d.lines[1].reqId, 'r-3')
  assert.equal(d.lines[1].sub, 1)
  // A route with its own level gets a real child at once.
  assert.equal(requestLoggerFactory(d.logger as never, { reqId: 'x' }, { level: 'debug' }) instanceof RequestLogger, false)
})
