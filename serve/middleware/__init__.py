"""ASGI middleware of the HTTP app: body limits and CORS."""
