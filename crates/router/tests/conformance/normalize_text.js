// Pre-processor, as the original's normalize_text sample: trims, collapses
// whitespace, lowercases `payload.payload`.
const { serve } = require("./serve");

serve("beamline.ext.pre.normalize_text.v1", (request) => {
  const message = request.payload || {};
  if (typeof message.payload !== "string") {
    // Not text (a JSON payload): nothing to normalise, pass it back as it came.
    return { payload: message, metadata: { normalized: false } };
  }
  const text = message.payload.trim().replace(/\s+/g, " ").toLowerCase();
  return { payload: { ...message, payload: text }, metadata: { normalized: true } };
});
