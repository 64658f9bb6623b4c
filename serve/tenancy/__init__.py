"""Who may call and how much: tenants, API keys, plan limits and usage metering."""
