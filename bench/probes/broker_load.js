// Broker load from a cheap client: RATE persistent, confirmed publishes per second into QUEUES
// quorum queues (round robin), each consumed and acked at once, for SECONDS (or until SIGTERM),
// then the queues are deleted. It puts a saga's message volume on the broker while using
// little CPU itself (about 0.1 core at 1,400/s here), so what it does to another client's
// latency is the broker's load, not the cores' contention.
// usage: NODE_PATH=bench/.node/node_modules node bench/probes/broker_load.js RATE SECONDS [QUEUES]
const amqp = require('amqplib');
const RATE = +process.argv[2], SECONDS = +process.argv[3], QUEUES = +(process.argv[4] || 4);
const PREFIX = `probe.load.${process.pid}`;
const body = Buffer.alloc(900, 'x'); // about a choreo envelope's size
let conn = null;
const queues = [...Array(QUEUES).keys()].map(i => `${PREFIX}.q${i}`);
(async () => {
  conn = await amqp.connect(process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1');
  const pub = await conn.createConfirmChannel();
  const sub = await conn.createChannel();
  await sub.prefetch(256);
  const tags = [];
  let acked = 0;
  for (const q of queues) {
    await pub.assertQueue(q, {durable: true, arguments: {'x-queue-type': 'quorum'}});
    tags.push((await sub.consume(q, m => { sub.ack(m); acked++; })).consumerTag);
  }
  let stop = false;
  process.on('SIGTERM', () => { stop = true; });
  const t0 = Date.now();
  let sent = 0;
  await new Promise(done => {
    const tick = () => {
      const due = Math.floor((Date.now() - t0) / 1000 * RATE);
      for (; sent < due; sent++) pub.sendToQueue(queues[sent % QUEUES], body, {persistent: true});
      if (stop || Date.now() - t0 >= SECONDS * 1000) done(); else setTimeout(tick, 1);
    };
    tick();
  });
  await pub.waitForConfirms();
  // Every message consumed before the consumers go: an ack after a queue's deletion would
  // close the channel.
  while (acked < sent) await new Promise(r => setTimeout(r, 10));
  for (const tag of tags) await sub.cancel(tag);
  for (const q of queues) await pub.deleteQueue(q);
  await conn.close();
  console.log(`broker_load: ${sent} messages in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
})().catch(async err => {
  console.error(err);
  // Durable queues outlive this process: delete them on a fresh channel (the failed one may be closed).
  try {
    const ch = await conn.createChannel();
    for (const q of queues) await ch.deleteQueue(q);
  } catch (cleanup) {
    console.error(`broker_load: could not delete ${queues.join(', ')}: ${cleanup}`);
  }
  process.exit(1);
});
