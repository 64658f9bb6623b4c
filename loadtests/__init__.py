"""Black-box HTTP load tests for the img2img service (locust scenarios, shapes, report runner)."""
