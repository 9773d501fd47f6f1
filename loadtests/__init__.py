"""Load tests and the benchmarks that drive the Serve app over HTTP (locust, `crosstrim bench e2e`, the hop)."""
