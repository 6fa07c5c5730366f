"""The OpenAI-compatible HTTP service: wire types, routes, tenants' limits, streaming."""
