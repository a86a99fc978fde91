// Provider, as the original's test_provider sample: reads `prompt` (or `body`),
// answers a mock response with token counts of length / 4 (often fractional); on an
// exception answers the error shape.
const { serve } = require("./serve");

serve("beamline.provider.test_provider.v1", (request) => {
  const providerId = request.provider_id || "test_provider";
  try {
    const prompt = request.prompt || request.body || "";
    if (String(prompt).includes("explode")) {
      throw new Error("the mock model exploded");
    }
    const output = `Mock response to: ${prompt}`;
    const promptTokens = String(prompt).length / 4;
    const completionTokens = output.length / 4;
    return {
      provider_id: providerId,
      output,
      usage: {
        prompt_tokens: promptTokens,
        completion_tokens: completionTokens,
        total_tokens: promptTokens + completionTokens,
      },
      metadata: {
        model: "mock-model",
        max_tokens: String((request.parameters || {}).max_tokens),
        seen_trace_id: request.trace_id,
      },
    };
  } catch (err) {
    return { provider_id: providerId, status: "error", error_code: "provider_exception", error_message: err.message };
  }
});
