import { test } from 'node:test'
import assert from 'node:assert/strict'
import { setTimeout as sleep } from 'node:timers/promises'
import pino from 'pino'
import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import { BATCH_BYTES, BATCH_MS, lineWriter, type AccessLine } from '../plugins/access-log.js'
import { JsonLines } from '../src/json-lines.js'

/** What one piece writes, alone on a line. */
function written (write: (lines: JsonLines) => void): string {
  const lines = new JsonLines(1024)
  lines.begin()
  write(lines)
  assert.equal(lines.end(), true)
  return lines.take()
}

test('JsonLines writes strings as JSON.stringify does', () => {
  const samples = ['', 'GET', '/api/items?x=1&y=2', 'a"b', 'back\\slash', 'tab\there', 'nl\n', '\u0001', '\u007f', 'é', 'Ωmega', '\ud83d\ude00', 'lone \ud800', 'lone \udfff end', '</script>', '\u2028']
  for (const s of samples) assert.equal(written((l) => l.string(s)), JSON.stringify(s), s)
  assert.equal(written((l) => l.string(null)), 'null')
})

test('JsonLines writes numbers as JSON.stringify does, and milliseconds in hundredths', () => {
  for (const n of [0, 7, 10, 200, 1024, 1_795_421_010_186, 2 ** 53, 1e21, 0.5, -3, -0.25, Number.NaN, Infinity]) {
    assert.equal(written((l) => l.number(n)), JSON.stringify(n), String(n))
  }
  assert.equal(written((l) => l.number(null)), 'null')
  const fixed = [0, 0.001, 0.004, 0.005, 0.1, 0.99, 1, 1.005, 1.1, 1.25, 2.345, 10, 12.3, 99.999, 100, 1234.5678, 86_400_000.12, 1e13 + 0.5, -1.234, Number.NaN]
  let seed = 7
  const random = (): number => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed / 2 ** 31 }
  const values = [...fixed, ...Array.from({ length: 20_000 }, () => random() * 10 ** (random() * 9))]
  for (const ms of values) assert.equal(written((l) => l.ms(ms)), JSON.stringify(Math.round(ms * 100) / 100), String(ms))
  assert.equal(written((l) => l.ms(null)), 'null')
})

test('JsonLines takes back a line that does not fit, and keeps the lines before it', () => {
  const lines = new JsonLines(32)
  lines.begin()
  lines.string('first')
  lines.raw(Buffer.from('\n'))
  assert.equal(lines.end(), true)
  lines.begin()
  lines.number(12345)
  lines.string('x'.repeat(40))
  lines.raw(Buffer.from('\n'))
  assert.equal(lines.end(), false)
  assert.equal(lines.take(), '"first"\n')
  assert.equal(lines.length, 0)
})

/** A pino logger over a destination that records each write, as the writer hands it over. */
function recorded (): { logger: FastifyBaseLogger, writes: string[] } {
  const writes: string[] = []
  const logger = pino({ level: 'info' }, { write: (chunk: string) => { writes.push(chunk) } }) as unknown as FastifyBaseLogger
  return { logger, writes }
}

function fields (path: string): AccessLine {
  return { msg: 'request', ip: '127.0.0.1', route: 'r', method: 'GET', path, status: 200, target: 'http://10.0.0.1:8080', upstreamMs: 1.234, durationMs: 2.5, bytesIn: 0, bytesOut: 1024, cache: null, error: null }
}

const req = (id: string): FastifyRequest => ({ id, traceId: '' }) as unknown as FastifyRequest

test('access lines go out in batches of whole lines, in order, none larger than the buffer', async () => {
  const { logger, writes } = recorded()
  const write = lineWriter(logger)
  assert.ok(write !== undefined)
  // One line far larger than the buffer goes out on its own, between its neighbours.
  const huge = '"'.repeat(BATCH_BYTES)
  const paths: string[] = []
  for (let i = 0; i < 600; i++) paths.push(i === 300 ? huge : `/items/${i}?page=${i % 7}`)
  paths.forEach((p, i) => write(req(`id-${i}`), fields(p)))
  // Full batches were written at once, without waiting for the timer.
  assert.ok(writes.length >= 3, `${writes.length} writes before the timer`)
  await sleep(BATCH_MS * 3)
  const lines: Array<Record<string, unknown>> = []
  for (const w of writes) {
    assert.ok(w.endsWith('\n'), 'a write ends at a line end')
    if (w.length < BATCH_BYTES * 2) assert.ok(Buffer.byteLength(w) <= BATCH_BYTES, `a batch of ${Buffer.byteLength(w)} bytes`)
    for (const text of w.split('\n').slice(0, -1)) lines.push(JSON.parse(text) as Record<string, unknown>)
  }
  assert.deepEqual(lines.map((l) => l.reqId), paths.map((_, i) => `id-${i}`))
  assert.deepEqual(lines.map((l) => l.path), paths)
  assert.equal(lines[0].durationMs, 2.5)
  assert.equal(lines[0].upstreamMs, 1.23)
})

test('steady traffic is written by full batches plus one timed write per 100 ms, not one per batch', async () => {
  const { logger, writes } = recorded()
  const write = lineWriter(logger)
  assert.ok(write !== undefined)
  // Bursts of lines for 0.5 s: a few MiB, dozens of full batches.
  let n = 0
  const started = Date.now()
  while (Date.now() - started < 500) {
    for (let i = 0; i < 100; i++) {
      const f = fields(`/steady/${n}`)
      write(req(`s-${n++}`), f)
    }
    await sleep(5)
  }
  await sleep(BATCH_MS * 3)
  const elapsed = Date.now() - started
  assert.equal(writes.join('').split('\n').length - 1, n, 'every line written once')
  // A batch is written full when the next line might not fit (3 bytes per character at most);
  // any shorter write is a timed one, of which there is one per 100 ms at most.
  const longest = Math.max(...writes.flatMap((w) => w.split('\n').map((l) => l.length + 1)))
  const sizes = writes.map((w) => Buffer.byteLength(w))
  const full = sizes.filter((b) => b > BATCH_BYTES - 3 * longest).length
  const timed = sizes.length - full
  assert.ok(full >= 5, `${full} full batches`)
  // A timer left behind by each full batch would add a partial write per full one.
  assert.ok(timed <= Math.ceil(elapsed / BATCH_MS) + 1, `${timed} partial writes (and ${full} full) in ${elapsed} ms`)
})
