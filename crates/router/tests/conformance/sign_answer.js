// Post-processor written to the original's API document: reads `message`, answers
// `{"message": {…}, "context": {…}}`.
const { serve } = require("./serve");

serve("beamline.ext.post.sign_answer.v1", (request) => {
  const message = request.message || {};
  return {
    message: { ...message, payload: `${message.payload} [reviewed]` },
    context: { reviewed_by: "sign_answer", answer_of: (message.metadata || {}).provider_id },
  };
});
