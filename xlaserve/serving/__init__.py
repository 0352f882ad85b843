"""Network front ends over one `AsyncEngine`: gRPC (xlaserve's API, JetStream's Orchestrator,
health, reflection) and OpenAI-compatible HTTP, run together by `server.serve`."""
