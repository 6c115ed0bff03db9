"""The route families vLLM serves, one module each; `proxy.http.routes` maps paths to them."""
