import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { join } from 'node:path'
import { InFlight } from '../src/inflight.js'

test('in-flight registry: each item removed once, the rest kept, walking a snapshot', () => {
  const live = new InFlight<{ n: number }>()
  const items = Array.from({ length: 5 }, (_, n) => ({ n }))
  for (const item of items) live.add(item)
  assert.equal(live.delete(items[1]), true)
  assert.equal(live.delete(items[1]), false, 'a second close of one response releases nothing')
  assert.equal(live.delete({ n: 9 }), false, 'never added')
  assert.equal(live.delete(items[4]), true, 'the last slot')
  assert.equal(live.delete(items[0]), true, 'the first slot, refilled by the last item')
  assert.deepEqual(live.values().map((i) => i.n).sort(), [2, 3])
  for (const item of live.values()) live.delete(item)
  assert.equal(live.size, 0)
  live.add(items[1])
  assert.deepEqual(live.values(), [items[1]], 'a removed item can come back')
})

/*
 * The reason the registry is not a Set (src/inflight.ts): once a Set's table is in the old
 * generation, each table it is rebuilt into is kept alive by the one before, with everything it
 * held, and every request passed through it is promoted. A child process with a 1 MiB young
 * generation and a scavenge every 1000 requests, each request's objects long dead by the next
 * scavenge: only the chain can promote them. (A Set promoted 14 of these 29 MiB on Node 20.) The
 * same run with every request kept alive shows that the harness sees promotion at all.
 */
const CHURN = `
const { InFlight } = require(${JSON.stringify(join(__dirname, '..', 'src', 'inflight.js'))})
const v8 = require('node:v8')
const registry = new InFlight()
const kept = process.argv[1] === 'kept' ? [] : undefined
const window = []
for (let i = 0; i < 50; i++) { const r = { body: new Array(64).fill(i) }; registry.add(r); window.push(r) }
gc() // the registry and its storage now live in the old generation, as in a running gateway
const old = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'old_space').space_used_size
const before = old()
for (let i = 0; i < 60000; i++) {
  const r = { body: new Array(64).fill(i) }
  registry.add(r)
  window.push(r)
  kept?.push(r)
  registry.delete(window.shift())
  if (i % 1000 === 999) gc({ type: 'minor' })
}
process.stdout.write(String(old() - before))
`

/** Bytes a churn script (run with a 1 MiB young generation) left promoted to the old generation. */
function promotedBy (script: string, arg: string): number {
  const out = execFileSync(process.execPath, ['--expose-gc', '--max-semi-space-size=1', '--single-threaded-gc', '-e', script, arg], { encoding: 'utf8' })
  return Number(out)
}

test('in-flight registry: requests that passed through it are not promoted to the old generation', () => {
  const requestBytes = 60000 * 64 * 8
  const mib = (n: number): string => `${(n / 1048576).toFixed(1)} MiB`
  const control = promotedBy(CHURN, 'kept')
  assert.ok(control > requestBytes / 2, `the harness saw ${mib(control)} promoted of ${mib(requestBytes)} kept alive`)
  const viaRegistry = promotedBy(CHURN, 'passed')
  assert.ok(viaRegistry < requestBytes / 20, `${mib(viaRegistry)} promoted of ${mib(requestBytes)} of requests`)
})

const COUNTING = `
const { MemoryRateLimitStore } = require(${JSON.stringify(join(__dirname, '..', 'src', 'stores', 'rate-limit.js'))})
const v8 = require('node:v8')
const store = new MemoryRateLimitStore()
for (let i = 0; i < 100; i++) store.consumeSync('client' + i, 1e9, 60000)
gc()
const old = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'old_space').space_used_size
const before = old()
let request
for (let i = 0; i < 200000; i++) {
  store.consumeSync('client' + (i % 3), 1e9, 60000)
  request = { body: new Array(32).fill(i) }
  if (i % 1000 === 999) gc({ type: 'minor' })
}
process.stdout.write(String(old() - before))
`

test('memory rate-limit store: counting requests promotes nothing per request', () => {
  // Known keys are counted in place; a delete and re-insert per request promoted ~47 bytes each.
  const bytes = promotedBy(COUNTING, '')
  assert.ok(bytes / 200000 < 8, `${(bytes / 200000).toFixed(1)} bytes promoted per counted request`)
})

const HITS = `
const { MemoryCacheStore } = require(${JSON.stringify(join(__dirname, '..', 'src', 'stores', 'cache-memory.js'))})
const v8 = require('node:v8')
const store = new MemoryCacheStore(64 * 1024 * 1024)
const entry = (i) => ({ status: 200, headers: {}, body: Buffer.alloc(16), route: 'r', vary: [], variant: '', responseTime: 0, initialAge: 0 })
;(async () => {
  for (let i = 0; i < 100; i++) await store.set('k' + i, entry(i), 600000)
  gc()
  const old = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'old_space').space_used_size
  const before = old()
  let request
  for (let i = 0; i < 200000; i++) {
    await store.get('k' + (i % 3))
    request = { body: new Array(32).fill(i) }
    if (i % 1000 === 999) gc({ type: 'minor' })
  }
  process.stdout.write(String(old() - before))
})()
`

test('memory cache store: hits on hot entries promote nothing per request', () => {
  // A delete and re-insert per hit (for LRU order) promoted ~47 bytes each.
  const bytes = promotedBy(HITS, '')
  assert.ok(bytes / 200000 < 8, `${(bytes / 200000).toFixed(1)} bytes promoted per hit`)
})
