"""An engine that generates on OpenAI-compatible upstreams, and the token counting it needs."""
