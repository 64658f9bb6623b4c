"""Who may call and how much: tenants, API keys, plan limits, usage metering and the admin CLI."""
