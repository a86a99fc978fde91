// The loop every sample shares, kept as the original's samples write it: connect,
// subscribe without a queue group, decode JSON, answer only with a reply subject.
const { connect, JSONCodec } = require("nats");

const jc = JSONCodec();

async function serve(defaultSubject, handle) {
  const subject = process.env.SUBJECT || defaultSubject;
  const nc = await connect({ servers: process.env.NATS_URL || "nats://127.0.0.1:4222" });
  const sub = nc.subscribe(subject);
  await nc.flush();
  // The test owns us: when it closes our stdin (or dies), we go.
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("close", () => process.exit(0));
  process.stdin.resume();
  console.log(`ready ${subject}`);
  for await (const msg of sub) {
    if (!msg.reply) continue;
    let reply;
    try {
      reply = await handle(jc.decode(msg.data));
    } catch (err) {
      reply = { error: { code: "extension_exception", message: String(err && err.message) } };
    }
    msg.respond(jc.encode(reply));
  }
}

module.exports = { serve };
