"""The Ray Serve deployments (ingress, model worker, job coordinator, tenant governor) as thin shells
around plain services, and the handles through which one deployment calls another."""
