"""The HTTP layer of `cloud-bridge serve` (FastAPI): `app` builds the application from the routers
(`api_routes` for `/api`, `openai_routes` for `/v1`, `page_routes` for `/`) and `deps` holds what
they share (registry, config, the bearer-token check, error mapping)."""
