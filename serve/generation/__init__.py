"""The shared generation service: one parameter type, source resolution, model call, stored outputs."""
