// Post-processor, as the original's mask_pii sample: reads `payload.payload` as the
// provider's response and masks card numbers and SSN-like digit groups.
const { serve } = require("./serve");

function mask(text) {
  let count = 0;
  const masked = text
    .replace(/\b(?:\d[ -]?){13,16}\b/g, () => { count++; return "****-****-****-****"; })
    .replace(/\b\d{3}[-. ]\d{2}[-. ]\d{4}\b/g, () => { count++; return "***-**-****"; });
  return { masked, count };
}

serve("beamline.ext.post.mask_pii.v1", (request) => {
  const response = request.payload || {};
  if (typeof response.payload !== "string") {
    return { payload: response, metadata: { pii_masked: 0 } };
  }
  const { masked, count } = mask(response.payload);
  return { payload: { ...response, payload: masked }, metadata: { pii_masked: count } };
});
