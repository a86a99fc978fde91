// Pre-processor for object payloads (the original accepted `task.payload` as a JSON
// object and `task.payload_ref` instead of it): adds a field to an object payload,
// and notes in the message's metadata the `payload_ref` it was handed.
const { serve } = require("./serve");

serve("beamline.ext.pre.enrich_object.v1", (request) => {
  const message = request.payload || {};
  const content = message.payload;
  const isObject = content !== null && typeof content === "object" && !Array.isArray(content);
  const metadata = { ...(message.metadata || {}) };
  if (message.payload_ref !== undefined) {
    metadata.seen_payload_ref = message.payload_ref;
  }
  return {
    payload: {
      ...message,
      payload: isObject ? { ...content, enriched_by: "enrich_object" } : content,
      metadata,
    },
  };
});
