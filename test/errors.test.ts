import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import * as errors from '../src/errors.js'

test('every error export is named after its code and README lists every code', () => {
  const readme = readFileSync(join(__dirname, '..', '..', 'README.md'), 'utf8')
  const codes = errors.allErrorCodes()
  assert.ok(codes.length >= 10)
  for (const code of codes) {
    const Ctor = (errors as unknown as Record<string, new () => Error & { code: string, statusCode: number }>)[code]
    assert.equal(typeof Ctor, 'function', `${code} is exported under its own name`)
    const err = new Ctor()
    assert.equal(err.code, code)
    assert.equal(err.statusCode, errors.errorMeta(code)?.status)
    assert.match(readme, new RegExp('`' + code + '`'), `README's error table lists ${code}`)
  }
})
