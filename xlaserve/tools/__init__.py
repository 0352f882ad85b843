"""OpenAI-style tool calling, apart from any protocol: tool definitions checked and turned into
a JSON-schema constraint (`schema`), a fallback prompt for chat templates without tools
(`template`), and parsers that find tool calls in a model's text, whole or streamed
(`parsers`)."""
