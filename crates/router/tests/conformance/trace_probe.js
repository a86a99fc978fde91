// Pre-processor that reads the W3C trace context the router sends in the request's
// NATS headers — as an extension in another language continues the router's trace
// (docs/EXTENSIONS.md, "Tracing") — and prints it, one line per request:
// `traceparent <value> tracestate <value or ->`. It answers the message unchanged, or
// the error shape when the text contains "fail-probe" (a failing step).
const { connect, JSONCodec } = require("nats");

const jc = JSONCodec();

async function main() {
  const subject = process.env.SUBJECT || "beamline.ext.pre.trace_probe.v1";
  const nc = await connect({ servers: process.env.NATS_URL || "nats://127.0.0.1:4222" });
  const sub = nc.subscribe(subject);
  await nc.flush();
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("close", () => process.exit(0));
  process.stdin.resume();
  console.log(`ready ${subject}`);
  for await (const msg of sub) {
    if (!msg.reply) continue;
    const traceparent = (msg.headers && msg.headers.get("traceparent")) || "-";
    const tracestate = (msg.headers && msg.headers.get("tracestate")) || "-";
    console.log(`traceparent ${traceparent} tracestate ${tracestate}`);
    const request = jc.decode(msg.data);
    const message = request.payload || {};
    if (typeof message.payload === "string" && message.payload.includes("fail-probe")) {
      msg.respond(jc.encode({ error: { code: "probe_failed", message: "asked to fail" } }));
      continue;
    }
    msg.respond(jc.encode({ payload: message, metadata: {} }));
  }
}

main();
