import { join } from 'node:path'
import { GatewayServer } from '../src/server.js'
import { ordersHandler, startService, usersHandler } from './services.js'

/** npm run demo: the two example services plus the gateway on the example config. */
async function main (): Promise<void> {
  const root = join(__dirname, '..', '..')
  const users = await startService('users', usersHandler, Number(process.env.USERS_PORT ?? 3001))
  const orders = await startService('orders', ordersHandler, Number(process.env.ORDERS_PORT ?? 3002))
  process.env.USERS_URL ??= `http://127.0.0.1:${users.port}`
  process.env.ORDERS_URL ??= `http://127.0.0.1:${orders.port}`
  const gateway = new GatewayServer({ configFile: join(root, 'gatehouse.yaml') })
  await gateway.start()
  const { port } = gateway.address()
  const admin = gateway.adminAddress()
  const base = `http://127.0.0.1:${port}`
  process.stdout.write(`
Gatehouse demo: users on :${users.port}, orders on :${orders.port}, gateway on :${port}${admin !== undefined ? `, admin on :${admin.port}` : ''}

Try:
  curl -i ${base}/users
  curl -i ${base}/users/1
  curl -i ${base}/orders
  curl -i -X POST ${base}/orders -H 'content-type: application/json' -d '{"item":"difference engine"}'
  curl -s ${base}/users/debug/echo        # what the upstream received (X-Forwarded-*, X-Request-Id)
  curl -i ${base}/nope                     # a problem+json 404
  curl -i ${base}/docs/                    # a static route
${admin !== undefined ? `  curl -s http://127.0.0.1:${admin.port}/readyz\n` : ''}
Ctrl-C stops everything.
`)
  const stop = async (): Promise<void> => {
    await gateway.close()
    users.server.close()
    orders.server.close()
  }
  process.once('SIGINT', () => { void stop() })
  process.once('SIGTERM', () => { void stop() })
  process.on('SIGHUP', () => { void gateway.reload() })
}

void main()
