// Publish one signed choreo event from Node.js with amqplib, using only docs/wire-format.md.
// usage: SECRET=... KID=k1 node publish.js [AMQP_URL] [EXCHANGE]
const amqp = require('amqplib');
const crypto = require('crypto');

async function main() {
  const url = process.argv[2] || 'amqp://guest:guest@localhost:5672';
  const exchange = process.argv[3] || 'choreo.events';
  const envelope = {
    id: crypto.randomUUID(),
    type: 'order.placed',
    source: 'node-shop',
    issued_at: new Date().toISOString(),               // e.g. 2026-11-20T10:00:00.123Z
    trace_id: crypto.randomBytes(16).toString('hex'),  // 32 lowercase hex chars
    payload: {order_id: 'o-node-1', customer_id: 'c-1', country: 'DE',
              items: [{sku: 'sku-1', qty: 1}], total_cents: 1200, currency: 'EUR'},
  };
  const body = Buffer.from(JSON.stringify(envelope), 'utf8');   // sign these exact bytes
  const sig = crypto.createHmac('sha256', process.env.SECRET).update(body).digest('hex');

  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  await new Promise((resolve, reject) => ch.publish(exchange, envelope.type, body, {
    persistent: true, contentType: 'application/json', messageId: envelope.id,
    headers: {'x-choreo-alg': 'hmac-sha256', 'x-choreo-kid': process.env.KID || 'k1', 'x-choreo-sig': sig},
  }, (err) => (err ? reject(err) : resolve())));          // resolves once the broker confirmed
  console.log(envelope.id);
  await conn.close();
}
main().catch((err) => { console.error(err); process.exit(1); });
