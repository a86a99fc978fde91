// Validator, as the original's pii_guard sample: rejects card numbers, SSNs
// (ddd-dd-dddd) and ddd.ddd.dddd phone numbers — and nothing else.
const { serve } = require("./serve");

const PATTERNS = [
  ["card_number", /\b(?:\d[ -]?){13,16}\b/],
  ["ssn", /\b\d{3}-\d{2}-\d{4}\b/],
  ["phone", /\b\d{3}\.\d{3}\.\d{4}\b/],
];

serve("beamline.ext.validate.pii_guard.v1", (request) => {
  const message = request.payload || {};
  const text = typeof message.payload === "string" ? message.payload : JSON.stringify(message.payload);
  for (const [type, re] of PATTERNS) {
    const m = text.match(re);
    if (m) {
      return { status: "reject", reason: "pii_detected", details: { type, match: m[0] } };
    }
  }
  return { status: "ok" };
});
